//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the stored verifier, making one
//! from a password, and the server side of the exchange as a pure state machine.
//!
//! The verifier is what the gateway keeps for a Postgres endpoint (the password exists only in
//! the connection string the CLI prints); the agent sets its ephemeral role's password as a
//! verifier too, so the clear password never reaches the server's statement log.

use base64::{engine::general_purpose::STANDARD as B64, Engine as _};
use ring::{digest, hmac, pbkdf2};
use std::{fmt, num::NonZeroU32};
use subtle::ConstantTimeEq;

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Above this a stored verifier is refused: one login must not cost the gateway seconds.
const MAX_ITERATIONS: u32 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM verifier")]
    BadVerifier,
    #[error("malformed SCRAM message: {0}")]
    Protocol(&'static str),
    #[error("SCRAM channel binding: {0}")]
    ChannelBinding(&'static str),
    #[error("password authentication failed")]
    WrongPassword,
}

/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64), PostgreSQL's format.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Verifier(<redacted>)")
    }
}

impl fmt::Display for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{MECHANISM}${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }
}

fn hmac256(key: &[u8], data: &[&[u8]]) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for d in data {
        ctx.update(d);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.sign().as_ref());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
    out
}

fn key32(s: &str) -> Result<[u8; 32], ScramError> {
    B64.decode(s)
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .ok_or(ScramError::BadVerifier)
}

impl Verifier {
    /// The verifier of `password` with the given salt. Passwords are used as bytes: SASLprep
    /// leaves the printable ASCII our generated passwords use unchanged.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let iterations = iterations.clamp(1, MAX_ITERATIONS);
        let mut salted = [0u8; 32];
        let n = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            n,
            salt,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac256(&salted, &[b"Client Key"]);
        Verifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac256(&salted, &[b"Server Key"]),
        }
    }

    /// A verifier with a fresh random 16-byte salt.
    pub fn generate(password: &str) -> Result<Verifier, ScramError> {
        let mut salt = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
            .map_err(|_| ScramError::BadVerifier)?;
        Ok(Verifier::from_password(password, &salt, DEFAULT_ITERATIONS))
    }

    pub fn parse(s: &str) -> Result<Verifier, ScramError> {
        let rest = s
            .strip_prefix(MECHANISM)
            .and_then(|r| r.strip_prefix('$'))
            .ok_or(ScramError::BadVerifier)?;
        let (params, keys) = rest.split_once('$').ok_or(ScramError::BadVerifier)?;
        let (iter, salt) = params.split_once(':').ok_or(ScramError::BadVerifier)?;
        let (stored, server) = keys.split_once(':').ok_or(ScramError::BadVerifier)?;
        let iterations: u32 = iter.parse().map_err(|_| ScramError::BadVerifier)?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(ScramError::BadVerifier);
        }
        let salt = B64.decode(salt).map_err(|_| ScramError::BadVerifier)?;
        if salt.is_empty() {
            return Err(ScramError::BadVerifier);
        }
        Ok(Verifier {
            iterations,
            salt,
            stored_key: key32(stored)?,
            server_key: key32(server)?,
        })
    }

    /// Does `password` match? Constant time in the comparison.
    pub fn matches(&self, password: &str) -> bool {
        let other = Verifier::from_password(password, &self.salt, self.iterations);
        bool::from(
            other.stored_key.ct_eq(&self.stored_key) & other.server_key.ct_eq(&self.server_key),
        )
    }
}

#[derive(Debug)]
enum State {
    Initial,
    SentFirst {
        client_first_bare: String,
        gs2_header: String,
        nonce: String,
        server_first: String,
        plus: bool,
    },
    Done,
}

/// The server side of one SCRAM-SHA-256 exchange. Pure: the caller supplies the random
/// server nonce and, for `-PLUS`, the `tls-server-end-point` hash of its certificate.
pub struct ScramServer {
    verifier: Verifier,
    server_nonce: String,
    end_point: Option<Vec<u8>>,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

impl ScramServer {
    pub fn new(
        verifier: Verifier,
        nonce_bytes: &[u8],
        tls_server_end_point: Option<Vec<u8>>,
    ) -> ScramServer {
        ScramServer {
            verifier,
            server_nonce: B64.encode(nonce_bytes),
            end_point: tls_server_end_point,
            state: State::Initial,
        }
    }

    /// What to offer in AuthenticationSASL, preferred first.
    pub fn mechanisms(&self) -> &'static [&'static str] {
        if self.end_point.is_some() {
            &[MECHANISM_PLUS, MECHANISM]
        } else {
            &[MECHANISM]
        }
    }

    /// Handles SASLInitialResponse; returns server-first-message.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<String, ScramError> {
        if !matches!(self.state, State::Initial) {
            return Err(ScramError::Protocol("unexpected client-first-message"));
        }
        self.state = State::Done;
        let plus = match mechanism {
            MECHANISM => false,
            MECHANISM_PLUS if self.end_point.is_some() => true,
            _ => return Err(ScramError::Protocol("unsupported SASL mechanism")),
        };
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Protocol("not UTF-8"))?;
        let (cbind, rest) = msg
            .split_once(',')
            .ok_or(ScramError::Protocol("no GS2 header"))?;
        match (cbind, plus) {
            ("n", false) => {}
            // The client could bind but believes we cannot: true unless we offered -PLUS,
            // in which case someone in between stripped it (PostgreSQL refuses likewise).
            ("y", false) if self.end_point.is_none() => {}
            ("y", false) => {
                return Err(ScramError::ChannelBinding(
                    "the client was told the server cannot bind",
                ))
            }
            ("p=tls-server-end-point", true) => {}
            (c, _) if c.starts_with("p=") => {
                return Err(ScramError::ChannelBinding(
                    "unsupported or unoffered binding type",
                ))
            }
            _ => return Err(ScramError::Protocol("bad GS2 channel binding flag")),
        }
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Protocol("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(ScramError::Protocol(
                "authorization identities are not supported",
            ));
        }
        let gs2_header = format!("{cbind},,");
        let mut fields = bare.split(',');
        // The user name is ignored, as PostgreSQL does: the startup packet's user counts.
        let user = fields.next().unwrap_or_default();
        if !user.starts_with("n=") {
            return Err(ScramError::Protocol(
                "expected n= (extensions are not supported)",
            ));
        }
        let client_nonce = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(ScramError::Protocol("no client nonce"))?;
        if !printable(client_nonce) {
            return Err(ScramError::Protocol("bad client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::SentFirst {
            client_first_bare: bare.to_string(),
            gs2_header,
            nonce,
            server_first: server_first.clone(),
            plus,
        };
        Ok(server_first)
    }

    /// Handles SASLResponse; returns server-final-message once the proof checks.
    pub fn client_final(&mut self, data: &[u8]) -> Result<String, ScramError> {
        let State::SentFirst {
            client_first_bare,
            gs2_header,
            nonce,
            server_first,
            plus,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Protocol("unexpected client-final-message"));
        };
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Protocol("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Protocol("no proof"))?;
        let mut fields = without_proof.split(',');
        let cb = fields
            .next()
            .and_then(|f| f.strip_prefix("c="))
            .ok_or(ScramError::Protocol("no channel binding"))?;
        let r = fields
            .next()
            .and_then(|f| f.strip_prefix("r="))
            .ok_or(ScramError::Protocol("no nonce"))?;
        let mut expected_cb = gs2_header.into_bytes();
        if plus {
            expected_cb.extend_from_slice(self.end_point.as_deref().unwrap_or_default());
        }
        let cb = B64
            .decode(cb)
            .map_err(|_| ScramError::Protocol("bad channel binding encoding"))?;
        if !bool::from(cb.ct_eq(&expected_cb)) {
            return Err(ScramError::ChannelBinding(
                "channel binding data does not match",
            ));
        }
        if r != nonce {
            return Err(ScramError::Protocol("nonce mismatch"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Protocol("bad proof"))?;
        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hmac256(&self.verifier.stored_key, &auth_message);
        let mut client_key = [0u8; 32];
        for (k, (p, s)) in client_key
            .iter_mut()
            .zip(proof.iter().zip(client_signature.iter()))
        {
            *k = p ^ s;
        }
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::WrongPassword);
        }
        let server_signature = hmac256(&self.verifier.server_key, &auth_message);
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The `tls-server-end-point` channel binding data of a certificate (RFC 5929): its hash with
/// the signature algorithm's digest, SHA-256 for MD5/SHA-1/SHA-256 signatures. `None` for
/// algorithms we do not map, in which case -PLUS is simply not offered.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let oid = cert.signature_algorithm.algorithm.to_id_string();
    let alg = match oid.as_str() {
        // ecdsa-with-SHA256, sha256WithRSAEncryption
        "1.2.840.10045.4.3.2" | "1.2.840.113549.1.1.11" => &digest::SHA256,
        // ecdsa-with-SHA384, sha384WithRSAEncryption
        "1.2.840.10045.4.3.3" | "1.2.840.113549.1.1.12" => &digest::SHA384,
        // ecdsa-with-SHA512, sha512WithRSAEncryption
        "1.2.840.10045.4.3.4" | "1.2.840.113549.1.1.13" => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(alg, cert_der).as_ref().to_vec())
}

#[cfg(test)]
#[path = "scram_tests.rs"]
mod tests;
