//! `Postern-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`: the
//! receiver recomputes the MAC over the timestamp and the exact body bytes with the secret it
//! was shown when the webhook was set, compares in constant time and refuses old timestamps
//! (a replayed delivery carries its old `t`; every retry is signed afresh).

use endpoint_types::secret::Secret;
use ring::hmac;

/// The header every delivery carries.
pub const HEADER: &str = "Postern-Signature";
/// How the secrets begin, so one found in a config file or a log is recognisable.
const SECRET_PREFIX: &str = "whsec_";

/// A fresh signing secret: `whsec_` and 32 random bytes in hex.
pub fn generate_secret() -> Secret {
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    Secret::new(format!("{SECRET_PREFIX}{}", hex::encode(bytes)))
}

fn mac(secret: &Secret, t: i64, body: &[u8]) -> hmac::Tag {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(t.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    ctx.sign()
}

/// The header's value for `body` sent at unix second `t`. The key is the secret's text as
/// shown (`whsec_…`), byte for byte.
pub fn header_value(secret: &Secret, t: i64, body: &[u8]) -> String {
    format!("t={t},v1={}", hex::encode(mac(secret, t, body).as_ref()))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the signature header has no t= or no v1= part")]
    Malformed,
    #[error("the signature is {age_s} s away from now (tolerance {tolerance_s} s)")]
    Stale { age_s: i64, tolerance_s: i64 },
    #[error("no v1 signature matches the body")]
    Mismatch,
}

/// What a receiver does (the README shows the same in a few lines of Python): parse, check
/// the timestamp is within `tolerance_s` of `now_s`, and compare every `v1=` in constant time.
pub fn verify(
    secret: &Secret,
    header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::Malformed);
    }
    let age_s = now_s.saturating_sub(t);
    if age_s.saturating_abs() > tolerance_s {
        return Err(SignatureError::Stale { age_s, tolerance_s });
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    let mut signed = t.to_string().into_bytes();
    signed.push(b'.');
    signed.extend_from_slice(body);
    if v1
        .iter()
        .any(|sig| hmac::verify(&key, &signed, sig).is_ok())
    {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        let s = Secret::new("whsec_test");
        assert_eq!(
            header_value(&s, 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
    }

    #[test]
    fn a_signed_body_verifies_and_a_changed_one_does_not() {
        let s = generate_secret();
        assert!(s.expose().starts_with("whsec_") && s.expose().len() == 6 + 64);
        let body = br#"{"event":"approval.waiting"}"#;
        let h = header_value(&s, 1000, body);
        assert_eq!(verify(&s, &h, body, 1010, 300), Ok(()));
        assert_eq!(
            verify(&s, &h, br#"{"event":"approval.waitinG"}"#, 1010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&generate_secret(), &h, body, 1010, 300),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too: moving it breaks the MAC.
        let moved = h.replace("t=1000", "t=1005");
        assert_eq!(
            verify(&s, &moved, body, 1010, 300),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn replays_outside_the_tolerance_and_malformed_headers_are_refused() {
        let s = generate_secret();
        let h = header_value(&s, 1000, b"x");
        assert!(matches!(
            verify(&s, &h, b"x", 2000, 300),
            Err(SignatureError::Stale { .. })
        ));
        for bad in ["", "t=1000", "v1=00", "t=x,v1=00", "t=1000,v1=zz"] {
            assert_eq!(
                verify(&s, bad, b"x", 1000, 300),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
    }
}
