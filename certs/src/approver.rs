//! Approver keys and the appliance's check of a signed decision.
//!
//! An approver signs [`ApprovalStatement::canonical`] with an Ed25519 key made on their own
//! machine (`postern approvals key create`), or — from the planned web console — with a
//! WebAuthn passkey (ES256). The agent trusts only the public keys in its `agent.toml`
//! (`[[approver]]`) and verifies every decision the policy reserves for a person before it
//! acts ([`ApprovalVerifier`]).

use base64::{
    engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD},
    Engine,
};
use endpoint_types::approval::{
    check_binding, ApprovalInvalid, ApprovalSignature, ApprovalStatement, DecidedContent,
    SignedDecision,
};
use jiff::Timestamp;
use ring::{
    digest,
    rand::SystemRandom,
    signature::{self, Ed25519KeyPair, KeyPair},
};
use std::collections::HashMap;

const PEM_LABEL: &str = "PRIVATE KEY";
const SSH_ED25519: &str = "ssh-ed25519";
/// Our name for a passkey's public key: the uncompressed P-256 point, base64.
const WEBAUTHN_ES256: &str = "webauthn-es256";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApproverKeyError {
    #[error("not an approver private key (expected a PEM \"PRIVATE KEY\" made by `postern approvals key create`): {0}")]
    BadPrivateKey(String),
    #[error(
        "not an approver public key (expected `ssh-ed25519 AAAA…` or `webauthn-es256 …`): {0}"
    )]
    BadPublicKey(String),
    #[error("cannot make a key: {0}")]
    Generate(String),
}

/// An approver's public key, as `agent.toml` lists it.
#[derive(Clone, PartialEq, Eq)]
pub enum ApproverPublicKey {
    Ed25519([u8; 32]),
    /// A passkey's P-256 public key (65-byte uncompressed point).
    WebauthnEs256(Vec<u8>),
}

impl std::fmt::Debug for ApproverPublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key_id())
    }
}

fn ssh_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads one SSH wire string, returning it and the rest.
fn read_ssh_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = b.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    (rest.len() >= len).then(|| rest.split_at(len))
}

impl ApproverPublicKey {
    /// `ssh-ed25519 AAAA… [comment]` (OpenSSH's form; `approvals key create` prints the same) or
    /// `webauthn-es256 BASE64 [comment]`.
    pub fn parse(text: &str) -> Result<ApproverPublicKey, ApproverKeyError> {
        let bad = |why: &str| ApproverKeyError::BadPublicKey(why.to_string());
        let mut parts = text.split_whitespace();
        let (Some(scheme), Some(data)) = (parts.next(), parts.next()) else {
            return Err(bad("expected a scheme and a base64 key"));
        };
        let blob = STANDARD
            .decode(data)
            .or_else(|_| STANDARD_NO_PAD.decode(data))
            .map_err(|_| bad("the key is not base64"))?;
        match scheme {
            SSH_ED25519 => {
                let (name, rest) = read_ssh_string(&blob).ok_or_else(|| bad("truncated key"))?;
                let (key, rest) = read_ssh_string(rest).ok_or_else(|| bad("truncated key"))?;
                if name != SSH_ED25519.as_bytes() || !rest.is_empty() {
                    return Err(bad("not an ssh-ed25519 key blob"));
                }
                let key: [u8; 32] = key
                    .try_into()
                    .map_err(|_| bad("an Ed25519 key is 32 bytes"))?;
                Ok(ApproverPublicKey::Ed25519(key))
            }
            WEBAUTHN_ES256 => {
                if blob.len() != 65 || blob.first() != Some(&4) {
                    return Err(bad("a P-256 key is a 65-byte uncompressed point"));
                }
                Ok(ApproverPublicKey::WebauthnEs256(blob))
            }
            other => Err(bad(&format!("unknown key scheme {other:?}"))),
        }
    }

    fn wire_blob(&self) -> (&'static str, Vec<u8>) {
        match self {
            ApproverPublicKey::Ed25519(k) => {
                let mut blob = Vec::with_capacity(51);
                ssh_string(&mut blob, SSH_ED25519.as_bytes());
                ssh_string(&mut blob, k);
                (SSH_ED25519, blob)
            }
            ApproverPublicKey::WebauthnEs256(p) => (WEBAUTHN_ES256, p.clone()),
        }
    }

    /// The one-line form `agent.toml` takes.
    pub fn to_line(&self, comment: &str) -> String {
        let (scheme, blob) = self.wire_blob();
        let line = format!("{scheme} {}", STANDARD.encode(blob));
        if comment.is_empty() {
            line
        } else {
            format!("{line} {comment}")
        }
    }

    /// `SHA256:…` of the key's wire blob; for Ed25519 keys what `ssh-keygen -l` prints.
    pub fn key_id(&self) -> String {
        let (_, blob) = self.wire_blob();
        let d = digest::digest(&digest::SHA256, &blob);
        format!("SHA256:{}", STANDARD_NO_PAD.encode(d.as_ref()))
    }

    fn verify(
        &self,
        statement: &ApprovalStatement,
        sig: &ApprovalSignature,
    ) -> Result<(), ApprovalInvalid> {
        let bad = || ApprovalInvalid::BadSignature(statement.key_id.clone());
        let b64 = |s: &str| {
            STANDARD
                .decode(s)
                .map_err(|_| ApprovalInvalid::Malformed("a signature field is not base64".into()))
        };
        match (self, sig) {
            (ApproverPublicKey::Ed25519(k), ApprovalSignature::Ed25519 { signature }) => {
                signature::UnparsedPublicKey::new(&signature::ED25519, k)
                    .verify(statement.canonical().as_bytes(), &b64(signature)?)
                    .map_err(|_| bad())
            }
            (
                ApproverPublicKey::WebauthnEs256(point),
                ApprovalSignature::Webauthn {
                    authenticator_data,
                    client_data_json,
                    signature,
                },
            ) => {
                let auth = b64(authenticator_data)?;
                let client = b64(client_data_json)?;
                check_client_data(statement, &client)?;
                // rpIdHash (32) | flags (1) | signCount (4): the user must have been present.
                let flags = auth.get(32).copied().ok_or_else(|| {
                    ApprovalInvalid::Malformed("authenticator data is too short".into())
                })?;
                if flags & 0x01 == 0 {
                    return Err(ApprovalInvalid::Malformed(
                        "the passkey did not see the user present".into(),
                    ));
                }
                let mut signed = auth;
                signed.extend_from_slice(digest::digest(&digest::SHA256, &client).as_ref());
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, point)
                    .verify(&signed, &b64(signature)?)
                    .map_err(|_| bad())
            }
            _ => Err(ApprovalInvalid::Malformed(
                "the signature's scheme does not match the approver's key".into(),
            )),
        }
    }
}

/// The client data a browser signed must be an assertion over this statement.
fn check_client_data(statement: &ApprovalStatement, client: &[u8]) -> Result<(), ApprovalInvalid> {
    #[derive(serde::Deserialize)]
    struct ClientData {
        #[serde(rename = "type")]
        kind: String,
        challenge: String,
    }
    let data: ClientData = serde_json::from_slice(client)
        .map_err(|e| ApprovalInvalid::Malformed(format!("client data: {e}")))?;
    let want = URL_SAFE_NO_PAD.encode(digest::digest(
        &digest::SHA256,
        &statement.challenge_input(),
    ));
    if data.kind != "webauthn.get" || data.challenge != want {
        return Err(ApprovalInvalid::BadSignature(statement.key_id.clone()));
    }
    Ok(())
}

/// An approver's Ed25519 signing key, loaded from its 0600 file.
pub struct ApproverKey {
    pair: Ed25519KeyPair,
    public: ApproverPublicKey,
}

impl std::fmt::Debug for ApproverKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ApproverKey({}, private half redacted)",
            self.public.key_id()
        )
    }
}

impl ApproverKey {
    /// A new key and its PEM (PKCS#8) text, to be written 0600 by the caller.
    pub fn generate() -> Result<(ApproverKey, crate::Secret), ApproverKeyError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| ApproverKeyError::Generate(e.to_string()))?;
        let pem = pem_encode(pkcs8.as_ref());
        let key = ApproverKey::from_pem(&pem)?;
        Ok((key, crate::Secret::new(pem)))
    }

    pub fn from_pem(text: &str) -> Result<ApproverKey, ApproverKeyError> {
        let der = pem_decode(text).ok_or_else(|| {
            ApproverKeyError::BadPrivateKey("no PEM \"PRIVATE KEY\" block".into())
        })?;
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| ApproverKeyError::BadPrivateKey(e.to_string()))?;
        let public = pair
            .public_key()
            .as_ref()
            .try_into()
            .map(ApproverPublicKey::Ed25519)
            .map_err(|_| ApproverKeyError::BadPrivateKey("not an Ed25519 key".into()))?;
        Ok(ApproverKey { pair, public })
    }

    pub fn public(&self) -> &ApproverPublicKey {
        &self.public
    }

    /// Signs the statement; its `key_id` is set to this key's.
    pub fn sign(&self, mut statement: ApprovalStatement) -> SignedDecision {
        statement.key_id = self.public.key_id();
        let sig = self.pair.sign(statement.canonical().as_bytes());
        SignedDecision {
            statement,
            signature: ApprovalSignature::Ed25519 {
                signature: STANDARD.encode(sig.as_ref()),
            },
        }
    }
}

fn pem_encode(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    out
}

fn pem_decode(text: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let body = text.split_once(&begin)?.1.split_once(&end)?.0;
    let b64: String = body.split_whitespace().collect();
    STANDARD.decode(b64).ok()
}

/// One key the customer trusts to approve for this appliance.
#[derive(Debug, Clone)]
pub struct Approver {
    pub name: String,
    pub key: ApproverPublicKey,
}

/// Who signed a decision the agent accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub approver: String,
    pub key_id: String,
}

/// The appliance's check of signed decisions: its approvers' keys and the statements already
/// used (kept until they expire, so a statement is good for one use).
#[derive(Debug, Default)]
pub struct ApprovalVerifier {
    approvers: HashMap<String, Approver>,
    used: HashMap<[u8; 32], Timestamp>,
}

impl ApprovalVerifier {
    pub fn new(approvers: Vec<Approver>) -> ApprovalVerifier {
        ApprovalVerifier {
            approvers: approvers.into_iter().map(|a| (a.key.key_id(), a)).collect(),
            used: HashMap::new(),
        }
    }

    /// No keys listed: the customer kept the old behaviour (the gateway's word is taken).
    pub fn is_empty(&self) -> bool {
        self.approvers.is_empty()
    }

    /// Checks a decision without using it up (e.g. a grant the agent already holds, sent again
    /// on a resync).
    pub fn check(
        &self,
        signed: &SignedDecision,
        appliance_id: &str,
        record_id: &str,
        asked: &DecidedContent,
        now: Timestamp,
    ) -> Result<Verified, ApprovalInvalid> {
        let s = &signed.statement;
        let approver = self
            .approvers
            .get(&s.key_id)
            .ok_or_else(|| ApprovalInvalid::UnknownKey(s.key_id.clone()))?;
        check_binding(s, appliance_id, record_id, asked, now)?;
        approver.key.verify(s, &signed.signature)?;
        Ok(Verified {
            approver: approver.name.clone(),
            key_id: s.key_id.clone(),
        })
    }

    /// Remembers a statement (by [`statement_digest`]) as used until `not_after`: what an
    /// agent that restarted learns back from its own record of used statements.
    pub fn mark_used(&mut self, digest: [u8; 32], not_after: Timestamp) {
        self.used.insert(digest, not_after);
    }

    /// Checks a decision and uses it up: the same statement is refused as `replayed` after.
    pub fn verify_once(
        &mut self,
        signed: &SignedDecision,
        appliance_id: &str,
        record_id: &str,
        asked: &DecidedContent,
        now: Timestamp,
    ) -> Result<Verified, ApprovalInvalid> {
        let verified = self.check(signed, appliance_id, record_id, asked, now)?;
        self.used.retain(|_, not_after| *not_after >= now);
        let digest = statement_digest(&signed.statement);
        if self.used.contains_key(&digest) {
            return Err(ApprovalInvalid::Replayed);
        }
        self.used.insert(digest, signed.statement.not_after);
        Ok(verified)
    }
}

/// What an output release binds (`DecidedContent::OpOutput`): sha256 over the held output as
/// it leaves the appliance and as the approver saw it — stdout, then stderr, each as UTF-8 text
/// preceded by its length in bytes (8 bytes, big-endian) — as lowercase hex.
pub fn output_sha256(stdout: &str, stderr: &str) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for text in [stdout, stderr] {
        ctx.update(&(text.len() as u64).to_be_bytes());
        ctx.update(text.as_bytes());
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// sha256 of the canonical statement: what a use is remembered by.
pub fn statement_digest(s: &ApprovalStatement) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, s.canonical().as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::{approval::Decision, control::GrantLevel};
    use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn content() -> DecidedContent {
        DecidedContent::Grant {
            level: GrantLevel::Operate,
            duration_s: 1800,
        }
    }

    fn statement() -> ApprovalStatement {
        ApprovalStatement {
            record_id: "gr_1".into(),
            appliance_id: "ap_1".into(),
            decision: Decision::Approve,
            content: content(),
            issued_at: t("2026-12-07T01:00:00Z"),
            not_after: t("2026-12-07T02:00:00Z"),
            key_id: String::new(),
        }
    }

    const NOW: &str = "2026-12-07T01:10:00Z";

    #[test]
    fn openssh_public_keys_parse_and_their_id_is_ssh_keygens() {
        // Made by `ssh-keygen -t ed25519`; `ssh-keygen -lf` printed the fingerprint.
        let line = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHPakkw44GnrnYvhqjlyT91AXrZzqGYHLSxyKs4mEnq4 bob@customer.example";
        let key = ApproverPublicKey::parse(line).unwrap();
        assert_eq!(
            key.key_id(),
            "SHA256:amQXdR5gSZt9jtPhDCOPcDoKEvGzO4cyK3mHNQAV7pk"
        );
        assert_eq!(key.to_line("bob@customer.example"), line);
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ",
            "ssh-ed25519 !!!",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHPakkw44GnrnYvhqjlyT91AXrZzqGYHLSxyKs4m",
            "webauthn-es256 AAAA",
        ] {
            assert!(ApproverPublicKey::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ed25519_decisions_verify_once_and_refuse_every_forgery() {
        let (key, pem) = ApproverKey::generate().unwrap();
        let again = ApproverKey::from_pem(pem.expose()).unwrap();
        assert_eq!(again.public(), key.public());
        assert!(!format!("{key:?}").contains(pem.expose()));
        let mut v = ApprovalVerifier::new(vec![Approver {
            name: "bob".into(),
            key: key.public().clone(),
        }]);
        let signed = key.sign(statement());
        let now = t(NOW);
        let ok = v
            .verify_once(&signed, "ap_1", "gr_1", &content(), now)
            .unwrap();
        assert_eq!(ok.approver, "bob");
        assert_eq!(
            v.verify_once(&signed, "ap_1", "gr_1", &content(), now),
            Err(ApprovalInvalid::Replayed)
        );
        // A resync may check it again without using it.
        assert!(v.check(&signed, "ap_1", "gr_1", &content(), now).is_ok());

        // The gateway edits what was decided after signing.
        let mut edited = key.sign(statement());
        edited.statement.content = DecidedContent::Grant {
            level: GrantLevel::Operate,
            duration_s: 86_400,
        };
        let asked = edited.statement.content.clone();
        assert_eq!(
            v.verify_once(&edited, "ap_1", "gr_1", &asked, now)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        // Another key, unknown to the appliance.
        let (stranger, _) = ApproverKey::generate().unwrap();
        let foreign = stranger.sign(statement());
        assert_eq!(
            v.verify_once(&foreign, "ap_1", "gr_1", &content(), now)
                .unwrap_err()
                .reason(),
            "unknown_key"
        );
        // A signature from the stranger put under the approver's key id.
        let mut borrowed = foreign.clone();
        borrowed.statement.key_id = key.public().key_id();
        assert_eq!(
            v.verify_once(&borrowed, "ap_1", "gr_1", &content(), now)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        // Another appliance's statement, another record's, and one past not-after.
        let mut s = statement();
        s.appliance_id = "ap_2".into();
        let other = key.sign(s);
        assert_eq!(
            v.verify_once(&other, "ap_1", "gr_1", &content(), now)
                .unwrap_err()
                .reason(),
            "wrong_appliance"
        );
        let fresh = key.sign(statement());
        assert_eq!(
            v.verify_once(&fresh, "ap_1", "gr_2", &content(), now)
                .unwrap_err()
                .reason(),
            "wrong_record"
        );
        assert_eq!(
            v.verify_once(
                &fresh,
                "ap_1",
                "gr_1",
                &content(),
                t("2026-12-07T03:00:00Z")
            )
            .unwrap_err()
            .reason(),
            "expired"
        );
        let garbage = SignedDecision {
            statement: fresh.statement.clone(),
            signature: ApprovalSignature::Ed25519 {
                signature: "not base64!".into(),
            },
        };
        assert_eq!(
            v.verify_once(&garbage, "ap_1", "gr_1", &content(), now)
                .unwrap_err()
                .reason(),
            "malformed"
        );
    }

    /// What a browser's `navigator.credentials.get` returns for this statement.
    fn passkey_assertion(
        pair: &EcdsaKeyPair,
        statement: &ApprovalStatement,
        flags: u8,
        kind: &str,
    ) -> ApprovalSignature {
        let challenge = URL_SAFE_NO_PAD.encode(digest::digest(
            &digest::SHA256,
            &statement.challenge_input(),
        ));
        let client = serde_json::json!({ "type": kind, "challenge": challenge, "origin": "https://console.example" })
            .to_string();
        let mut auth = digest::digest(&digest::SHA256, b"console.example")
            .as_ref()
            .to_vec();
        auth.push(flags);
        auth.extend_from_slice(&7u32.to_be_bytes());
        let mut signed = auth.clone();
        signed.extend_from_slice(digest::digest(&digest::SHA256, client.as_bytes()).as_ref());
        let sig = pair.sign(&SystemRandom::new(), &signed).unwrap();
        ApprovalSignature::Webauthn {
            authenticator_data: STANDARD.encode(auth),
            client_data_json: STANDARD.encode(client),
            signature: STANDARD.encode(sig.as_ref()),
        }
    }

    #[test]
    fn passkey_assertions_over_the_statement_verify() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = ApproverPublicKey::parse(&format!(
            "webauthn-es256 {} alice",
            STANDARD.encode(pair.public_key().as_ref())
        ))
        .unwrap();
        let mut v = ApprovalVerifier::new(vec![Approver {
            name: "alice".into(),
            key: public.clone(),
        }]);
        let mut s = statement();
        s.key_id = public.key_id();
        let now = t(NOW);
        let good = SignedDecision {
            statement: s.clone(),
            signature: passkey_assertion(&pair, &s, 0x05, "webauthn.get"),
        };
        assert_eq!(
            v.check(&good, "ap_1", "gr_1", &content(), now)
                .unwrap()
                .approver,
            "alice"
        );
        // The assertion was made for another statement (a longer grant).
        let mut longer = s.clone();
        longer.content = DecidedContent::Grant {
            level: GrantLevel::Operate,
            duration_s: 86_400,
        };
        let swapped = SignedDecision {
            statement: longer.clone(),
            signature: passkey_assertion(&pair, &s, 0x05, "webauthn.get"),
        };
        assert_eq!(
            v.check(&swapped, "ap_1", "gr_1", &longer.content, now)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        // No user presence, or a registration instead of an assertion.
        for (flags, kind) in [(0x00, "webauthn.get"), (0x05, "webauthn.create")] {
            let d = SignedDecision {
                statement: s.clone(),
                signature: passkey_assertion(&pair, &s, flags, kind),
            };
            assert!(v.check(&d, "ap_1", "gr_1", &content(), now).is_err());
        }
        // An Ed25519 signature under a passkey's key id.
        let (ed, _) = ApproverKey::generate().unwrap();
        let mut mixed = ed.sign(s.clone());
        mixed.statement.key_id = public.key_id();
        assert_eq!(
            v.verify_once(&mixed, "ap_1", "gr_1", &content(), now)
                .unwrap_err()
                .reason(),
            "malformed"
        );
    }
}
