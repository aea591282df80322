//! Bearer token formats. Parsing is pure; minting and hashing live in the gateway.
//!
//! - API tokens: `pst_<id>_<secret>`. The id finds the stored hash; the secret is compared
//!   against it in constant time.
//! - Enrollment tokens: `pse1_<base64url(JSON)>`, self-contained: they carry the CA
//!   fingerprint the agent pins, so `postern-agent enroll` needs nothing else.

use crate::secret::Secret;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use serde::{Deserialize, Serialize};

pub const API_TOKEN_PREFIX: &str = "pst_";
pub const ENROLLMENT_TOKEN_PREFIX: &str = "pse1_";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a Postern API token (expected pst_<id>_<secret>)")]
    NotApiToken,
    #[error(
        "not a Postern enrollment token (expected pse1_…, as printed by `postern appliance add`)"
    )]
    NotEnrollmentToken,
    #[error("enrollment token is damaged: {0}")]
    Damaged(&'static str),
}

/// A parsed API token: the public id and the secret half.
#[derive(Debug, Clone)]
pub struct ApiToken {
    pub id: String,
    pub secret: Secret,
}

impl ApiToken {
    pub fn format(id: &str, secret: &str) -> String {
        format!("{API_TOKEN_PREFIX}{id}_{secret}")
    }

    pub fn parse(s: &str) -> Result<ApiToken, TokenFormatError> {
        let rest = s
            .trim()
            .strip_prefix(API_TOKEN_PREFIX)
            .ok_or(TokenFormatError::NotApiToken)?;
        let (id, secret) = rest.split_once('_').ok_or(TokenFormatError::NotApiToken)?;
        if id.is_empty()
            || !id.bytes().all(|b| b.is_ascii_hexdigit())
            || secret.len() < 16
            || secret.len() > 128
        {
            return Err(TokenFormatError::NotApiToken);
        }
        Ok(ApiToken {
            id: id.to_string(),
            secret: Secret::new(secret),
        })
    }
}

/// What an enrollment token carries.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// Token id: finds the stored hash and the appliance it enrolls.
    pub id: String,
    pub secret: Secret,
    /// `sha256:<hex>` of the gateway CA certificate (DER) the agent pins.
    pub ca: String,
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("id", &self.id)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl EnrollmentToken {
    pub fn encode(&self) -> String {
        // Serialising a struct of strings cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        format!("{ENROLLMENT_TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
    }

    pub fn parse(s: &str) -> Result<EnrollmentToken, TokenFormatError> {
        let body = s
            .trim()
            .strip_prefix(ENROLLMENT_TOKEN_PREFIX)
            .ok_or(TokenFormatError::NotEnrollmentToken)?;
        if body.len() > 4096 {
            return Err(TokenFormatError::Damaged("too long"));
        }
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenFormatError::Damaged("not base64url"))?;
        let t: EnrollmentToken = serde_json::from_slice(&json)
            .map_err(|_| TokenFormatError::Damaged("unexpected contents"))?;
        if !t.ca.starts_with("sha256:") || t.ca.len() != 7 + 64 {
            return Err(TokenFormatError::Damaged(
                "CA fingerprint is not sha256:<64 hex>",
            ));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_token_round_trip() {
        let s = ApiToken::format("0123abcd", "s3cr3t-with_underscores-and-more");
        let t = ApiToken::parse(&s).unwrap();
        assert_eq!(t.id, "0123abcd");
        assert_eq!(t.secret.expose(), "s3cr3t-with_underscores-and-more");
        assert!(!format!("{t:?}").contains("s3cr3t"));
    }

    #[test]
    fn api_token_rejects_garbage() {
        for bad in [
            "",
            "pst_",
            "pst_zz_0123456789abcdefg",
            "abc_def",
            "pst_abcd_short",
        ] {
            assert!(ApiToken::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enrollment_token_round_trip_and_redaction() {
        let t = EnrollmentToken {
            id: "e1".into(),
            secret: Secret::new("topsecret"),
            ca: format!("sha256:{}", "a".repeat(64)),
        };
        let s = t.encode();
        assert!(s.starts_with("pse1_"));
        assert_eq!(EnrollmentToken::parse(&s).unwrap(), t);
        assert!(!format!("{t:?}").contains("topsecret"));
    }

    #[test]
    fn enrollment_token_rejects_garbage() {
        assert_eq!(
            EnrollmentToken::parse("pst_abc").unwrap_err(),
            TokenFormatError::NotEnrollmentToken
        );
        assert!(EnrollmentToken::parse("pse1_!!!").is_err());
        assert!(
            EnrollmentToken::parse(&format!("pse1_{}", URL_SAFE_NO_PAD.encode(b"{\"id\":1}")))
                .is_err()
        );
    }
}
