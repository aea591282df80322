//! The customer trail's signed heads (endpoint_types::trail_head): the agent signs its chain
//! head with the appliance key, keeps the latest head in a file beside the trail (outside the
//! trail file, so a trail cut short no longer matches it), hands it to the tunnel for the
//! gateway to anchor, records the gateway's signed heads as anchors, and checks all of that in
//! `postern-agent audit verify`.

use crate::audit::{sha256_hex, AuditError};
use certs::record_signature;
use endpoint_types::{
    api::{AuditRecord, AuditVerified, ChainVerifier},
    trail_head::{
        signed_bytes, Anchor, HeadFailure, HeadKeys, HeadVerifier, OutsideHead, SignedHead,
        TrailSide,
    },
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a signed head: {reason}", path.display())]
    Malformed { path: PathBuf, reason: String },
    #[error("the appliance key or certificate cannot sign or check heads: {0}")]
    Key(String),
}

impl HeadError {
    pub fn to_api_error(&self) -> ApiError {
        ApiError::new(ErrorCode::Internal, self.to_string())
            .hint("check the files named and the agent's permissions on them")
    }
}

/// Where the latest signed head of a trail is kept: beside the trail, in a file of its own.
pub fn head_file(audit_path: &Path) -> PathBuf {
    let mut name = audit_path.file_name().unwrap_or_default().to_os_string();
    name.push(".head");
    audit_path.with_file_name(name)
}

/// A head the trail no longer reached at start-up, kept aside.
pub fn missing_head_file(audit_path: &Path) -> PathBuf {
    let mut name = audit_path.file_name().unwrap_or_default().to_os_string();
    name.push(".head.missing");
    audit_path.with_file_name(name)
}

/// Where the gateway audit key the agent pinned is kept: beside the gateway CA it pinned.
pub fn gateway_key_file(ca_file: &Path) -> PathBuf {
    ca_file.with_file_name("gateway-audit.pub")
}

/// Signs the customer trail's heads with the appliance's tunnel key.
pub struct HeadSigner {
    /// Shared with the other signers; the certificate's fingerprint is the `key` of every head.
    signer: crate::appliance_key::ApplianceKey,
    appliance_id: String,
    head_file: PathBuf,
    latest: tokio::sync::watch::Sender<Option<SignedHead>>,
}

impl std::fmt::Debug for HeadSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeadSigner")
            .field("appliance_id", &self.appliance_id)
            .field("key", &self.signer.fingerprint())
            .finish_non_exhaustive()
    }
}

impl HeadSigner {
    pub fn load(
        key_file: &Path,
        cert_file: &Path,
        appliance_id: &str,
        audit_path: &Path,
    ) -> Result<HeadSigner, HeadError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| HeadError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let key_pem = certs::Secret::new(read(key_file)?);
        let signer =
            crate::appliance_key::ApplianceKey::from_pem(key_pem.expose(), &read(cert_file)?)
                .map_err(HeadError::Key)?;
        let head_file = head_file(audit_path);
        let last = read_head(&head_file).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the last signed head of the customer trail cannot be read; the next head replaces it");
            None
        });
        Ok(HeadSigner {
            signer,
            appliance_id: appliance_id.to_string(),
            head_file,
            latest: tokio::sync::watch::channel(last).0,
        })
    }

    /// At start-up: does the trail still reach the head kept beside it? If not, records were
    /// cut off (or the file replaced) while the agent was stopped: the head is kept aside in
    /// `.head.missing` so `audit verify` names it until the customer has looked (and removed
    /// it), and is returned for the caller to record. Reads the trail line by line once.
    pub fn check_trail_reaches(&self, audit_path: &Path) -> Option<(SignedHead, PathBuf)> {
        let head = self.latest.borrow().clone()?;
        let line = std::fs::File::open(audit_path).ok().and_then(|f| {
            BufReader::new(f)
                .lines()
                .map_while(Result::ok)
                .filter(|l| !l.trim().is_empty())
                .nth(usize::try_from(head.seq - 1).ok()?)
        });
        let reaches = line
            .and_then(|l| serde_json::from_str::<AuditRecord>(&l).ok())
            .filter(|r| r.seq == head.seq && r.kind == endpoint_types::trail_head::HEAD_KIND)
            .and_then(|r| serde_json::from_value::<SignedHead>(r.detail).ok())
            .is_some_and(|h| h.signature == head.signature && h.prev_hash == head.prev_hash);
        if reaches {
            return None;
        }
        let kept = missing_head_file(audit_path);
        if !kept.exists() {
            if let Err(e) = write_head(&kept, &head) {
                tracing::error!(error = %e, "cannot keep the missing head aside");
            }
        }
        tracing::error!(seq = head.seq, file = %kept.display(), "the customer trail no longer reaches its last signed head: records were cut off the end or the file was replaced while the agent was stopped; `postern-agent audit verify` names the head until the file is removed");
        self.latest.send_replace(None);
        Some((head, kept))
    }

    /// The head for a head record at `seq` after the record whose hash is `prev_hash`.
    pub fn sign(&self, seq: i64, prev_hash: &str, now: Timestamp) -> Result<SignedHead, HeadError> {
        let bytes = signed_bytes(
            TrailSide::Appliance,
            Some(&self.appliance_id),
            seq,
            prev_hash,
            &now,
        );
        let (signature, key) = self
            .signer
            .sign(&bytes)
            .map_err(|e| HeadError::Key(e.to_string()))?;
        Ok(SignedHead {
            trail: TrailSide::Appliance,
            appliance_id: Some(self.appliance_id.clone()),
            seq,
            prev_hash: prev_hash.to_string(),
            time: now,
            signature,
            key,
        })
    }

    /// A head record is durable: keep it outside the trail and hand it to the tunnel.
    pub fn written(&self, head: SignedHead) {
        if let Err(e) = write_head(&self.head_file, &head) {
            tracing::error!(error = %e, "cannot keep the customer trail's signed head beside it; `audit verify` compares with the previous one");
        }
        self.latest.send_replace(Some(head));
    }

    /// The key heads are signed with, shared (crate::cert_renewal swaps it).
    pub fn key(&self) -> crate::appliance_key::ApplianceKey {
        self.signer.clone()
    }

    /// The latest head, as it changes: the tunnel sends it to the gateway.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<SignedHead>> {
        self.latest.subscribe()
    }
}

/// Replaces the head file atomically (write, sync, rename), so a crash leaves the old or the new.
pub fn write_head(path: &Path, head: &SignedHead) -> Result<(), HeadError> {
    let err = |source| HeadError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_vec(head).map_err(|e| err(std::io::Error::other(e)))?;
    certs::write_private(&tmp, &text).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The head kept in `path`; none if there is no file.
pub fn read_head(path: &Path) -> Result<Option<SignedHead>, HeadError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HeadError::Malformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HeadError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The signature checks of `postern-agent audit verify`: own heads with the appliance
/// certificate, the gateway's heads with the key pinned at enrollment.
pub struct AgentKeys {
    pub cert_der: Vec<u8>,
    pub gateway_key: Option<String>,
    /// Certificates the appliance held before renewals (crate::cert_renewal), for the heads
    /// signed with their keys: a head is checked with the certificate it names.
    pub previous: Vec<Vec<u8>>,
}

impl HeadKeys for AgentKeys {
    fn own(&self, head: &SignedHead) -> Result<(), String> {
        let cert = self
            .previous
            .iter()
            .find(|der| certs::fingerprint(der) == head.key)
            .unwrap_or(&self.cert_der);
        record_signature::verify_with_cert(cert, &head.signed_bytes(), &head.signature)
            .map_err(|e| format!("{e} (with the appliance certificate)"))
    }

    fn peer(&self, anchor: &Anchor) -> Result<(), String> {
        let Some(pinned) = &self.gateway_key else {
            return Err("no gateway audit key is pinned (gateway-audit.pub beside ca_file)".into());
        };
        if anchor.head.key != *pinned {
            return Err(format!(
                "signed with key {}, not the pinned gateway audit key",
                anchor.head.key
            ));
        }
        record_signature::verify_with_public_key(
            pinned,
            &anchor.head.signed_bytes(),
            &anchor.head.signature,
        )
        .map_err(|e| e.to_string())
    }
}

/// What `postern-agent audit verify` is given besides the trail.
pub struct VerifyInputs {
    pub audit_path: PathBuf,
    pub keys: Option<AgentKeys>,
    /// Heads kept outside the trail: the head file, a head the gateway anchored.
    pub outside: Vec<OutsideHead>,
}

impl VerifyInputs {
    /// The enrolled agent's certificate, pinned gateway key and head file; plus `anchor`, a
    /// head of this appliance as the gateway anchored it (`postern audit anchor`), if given.
    pub fn load(
        audit_path: &Path,
        cert_file: Option<&Path>,
        ca_file: Option<&Path>,
        anchor: Option<&Path>,
    ) -> Result<VerifyInputs, HeadError> {
        let keys = match cert_file {
            Some(cert_file) => {
                let pem = std::fs::read(cert_file).map_err(|source| HeadError::Read {
                    path: cert_file.to_path_buf(),
                    source,
                })?;
                let cert_der = CertificateDer::from_pem_slice(&pem)
                    .map_err(|e| HeadError::Malformed {
                        path: cert_file.to_path_buf(),
                        reason: e.to_string(),
                    })?
                    .to_vec();
                let gateway_key = match ca_file.map(gateway_key_file) {
                    Some(path) => match std::fs::read_to_string(&path) {
                        Ok(k) => Some(k.trim().to_string()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                        Err(source) => return Err(HeadError::Read { path, source }),
                    },
                    None => None,
                };
                Some(AgentKeys {
                    cert_der,
                    gateway_key,
                    previous: crate::cert_renewal::previous_certs(cert_file),
                })
            }
            None => None,
        };
        let mut outside = Vec::new();
        for (file, source) in [
            (head_file(audit_path), "head file"),
            (missing_head_file(audit_path), "head kept aside at start-up"),
        ] {
            if let Some(head) = read_head(&file)? {
                outside.push(OutsideHead {
                    head,
                    source: format!("{source} ({})", file.display()),
                });
            }
        }
        if let Some(path) = anchor {
            let head = read_anchor(path)?;
            outside.push(OutsideHead {
                head,
                source: format!("gateway's anchor ({})", path.display()),
            });
        }
        Ok(VerifyInputs {
            audit_path: audit_path.to_path_buf(),
            keys,
            outside,
        })
    }
}

/// A head as `postern audit anchor` prints it: the head itself, or `{"anchor": head, …}`.
fn read_anchor(path: &Path) -> Result<SignedHead, HeadError> {
    let bytes = std::fs::read(path).map_err(|source| HeadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let malformed = |reason: String| HeadError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    let head = v.get("anchor").cloned().unwrap_or(v);
    serde_json::from_value(head).map_err(|e| malformed(e.to_string()))
}

/// Checks the chain, every head and anchor signature, and the heads kept outside the trail.
/// The error names the first record that fails, or the head that is missing.
pub fn verify(inputs: &VerifyInputs) -> Result<AuditVerified, ApiError> {
    let path = &inputs.audit_path;
    let file = match std::fs::File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(AuditError::Io {
                path: path.clone(),
                source,
            }
            .to_api_error())
        }
    };
    let mut chain = ChainVerifier::new();
    let mut heads = HeadVerifier::new(TrailSide::Appliance, inputs.outside.clone());
    let no_keys = NoKeys;
    for line in file.into_iter().flat_map(|f| BufReader::new(f).lines()) {
        let broken = |seq: i64, reason: String| {
            AuditError::Broken {
                path: path.clone(),
                seq,
                reason,
            }
            .to_api_error()
        };
        let line = line.map_err(|source| {
            AuditError::Io {
                path: path.clone(),
                source,
            }
            .to_api_error()
        })?;
        let seq = chain.next_seq();
        let record: AuditRecord = serde_json::from_str(&line)
            .map_err(|e| broken(seq, format!("line {seq} is not a record: {e}")))?;
        chain.push(&record, sha256_hex).map_err(|seq| {
            broken(
                seq,
                "the record was edited, deleted or moved (its seq, prev_hash or hash does not fit)"
                    .into(),
            )
        })?;
        let pushed = match &inputs.keys {
            Some(keys) => heads.push(&record, keys),
            None => heads.push(&record, &no_keys),
        };
        pushed.map_err(|f| head_failure(path, &f))?;
    }
    let summary = heads.finish().map_err(|f| head_failure(path, &f))?;
    Ok(AuditVerified {
        ok: true,
        records: chain.records(),
        heads: Some(summary),
    })
}

/// An unenrolled agent has no key: its trail has no heads, and one that claims any fails.
struct NoKeys;

impl HeadKeys for NoKeys {
    fn own(&self, _: &SignedHead) -> Result<(), String> {
        Err("this agent is not enrolled: no certificate to check heads with".into())
    }
    fn peer(&self, _: &Anchor) -> Result<(), String> {
        Err("this agent is not enrolled: no pinned gateway audit key".into())
    }
}

fn head_failure(path: &Path, f: &HeadFailure) -> ApiError {
    let mut details = serde_json::json!({ "seq": f.seq() });
    let hint = match f {
        HeadFailure::Record { .. } => {
            "a signed head or anchor was forged, moved or altered at this seq; keep a copy of the file for investigation"
        }
        HeadFailure::Missing { head, .. } => {
            details["missing_head"] = serde_json::to_value(head).unwrap_or_default();
            "the trail's end was cut off or the file replaced; keep a copy of the file and of its .head file, and compare with the head the gateway anchored (`postern audit anchor --appliance ID`)"
        }
    };
    ApiError::new(
        ErrorCode::AuditChainBroken,
        format!(
            "the audit trail {} is broken: {}",
            path.display(),
            f.message()
        ),
    )
    .hint(hint)
    .details(details)
}

/// The gateway's signed heads, as the agent receives them: checked against the gateway audit
/// key pinned at enrollment and recorded as anchors in the customer trail. A head signed with
/// any other key is refused, and the refusal recorded: never trusted silently.
#[derive(Debug)]
pub struct GatewayAnchors {
    key_file: PathBuf,
    pinned: std::sync::Mutex<Option<String>>,
    /// The seq of the last gateway head recorded, so a head sent again after a reconnect is
    /// recorded once.
    last_seq: std::sync::Mutex<i64>,
}

impl GatewayAnchors {
    pub fn load(ca_file: &Path) -> GatewayAnchors {
        let key_file = gateway_key_file(ca_file);
        let pinned = std::fs::read_to_string(&key_file)
            .ok()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        GatewayAnchors {
            key_file,
            pinned: std::sync::Mutex::new(pinned),
            last_seq: std::sync::Mutex::new(0),
        }
    }

    fn pinned(&self) -> Option<String> {
        self.pinned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The key the gateway names in its hello answer. An agent enrolled before gateways had
    /// audit keys pins it now (trust on first use), and says so in its trail; a key other than
    /// the pinned one is recorded as refused.
    pub fn hello(&self, offered: Option<&str>, audit: &crate::audit::AuditLog) {
        let Some(offered) = offered else { return };
        let actor = audit.agent_actor();
        match self.pinned() {
            Some(pinned) if pinned == offered => {}
            Some(pinned) => {
                tracing::error!(pinned = %pinned, offered = %offered, "the gateway presents another audit key than the one pinned at enrollment; its signed heads are refused");
                audit.record_or_log(crate::audit::Entry::new(
                    "audit.anchor_refused",
                    actor,
                    serde_json::json!({ "reason": "the gateway's audit key is not the pinned one", "pinned": pinned, "offered": offered }),
                ));
            }
            None => {
                if let Err(e) =
                    certs::write_private(&self.key_file, format!("{offered}\n").as_bytes())
                {
                    tracing::error!(file = %self.key_file.display(), error = %e, "cannot pin the gateway audit key");
                    return;
                }
                tracing::warn!(file = %self.key_file.display(), key = %offered, "pinned the gateway audit key on first sight (this agent was enrolled before gateways had one); compare it with audit-key.pub in the gateway's data dir");
                audit.record_or_log(crate::audit::Entry::new(
                    "audit.gateway_key_pinned",
                    actor,
                    serde_json::json!({ "key": offered, "file": self.key_file, "how": "first use: not given at enrollment" }),
                ));
                *self.pinned.lock().unwrap_or_else(|p| p.into_inner()) = Some(offered.to_string());
            }
        }
    }

    /// A signed head of the gateway's trail: recorded as an anchor if the pinned key signed it.
    pub fn on_head(&self, head: SignedHead, audit: &crate::audit::AuditLog) {
        let actor = audit.agent_actor();
        let checked = match self.pinned() {
            None => Err("no gateway audit key is pinned".to_string()),
            Some(pinned) if head.key != pinned => {
                Err("signed with another key than the pinned gateway audit key".into())
            }
            Some(pinned) => record_signature::verify_with_public_key(
                &pinned,
                &head.signed_bytes(),
                &head.signature,
            )
            .map_err(|e| e.to_string()),
        };
        if head.trail != TrailSide::Gateway {
            return;
        }
        match checked {
            Ok(()) => {
                let mut last = self.last_seq.lock().unwrap_or_else(|p| p.into_inner());
                if head.seq <= *last {
                    return;
                }
                *last = head.seq;
                drop(last);
                let anchor = Anchor {
                    head,
                    certificate: None,
                };
                audit.record_or_log(crate::audit::Entry::new(
                    endpoint_types::trail_head::ANCHOR_KIND,
                    actor,
                    serde_json::to_value(anchor).unwrap_or_default(),
                ));
            }
            Err(reason) => {
                tracing::error!(%reason, seq = head.seq, "refused the gateway's signed head");
                audit.record_or_log(crate::audit::Entry::new(
                    "audit.anchor_refused",
                    actor,
                    serde_json::json!({ "reason": reason, "head": head }),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditLog, Entry};
    use certs::record_signature::RecordSigner;

    /// An enrolled agent's files: key, certificate, and the trail path.
    struct Files {
        _dir: tempfile::TempDir,
        key: PathBuf,
        cert: PathBuf,
        ca: PathBuf,
        trail: PathBuf,
    }

    fn files() -> Files {
        let dir = tempfile::tempdir().unwrap();
        let now = Timestamp::now();
        let ca = certs::Ca::generate("ca", now).unwrap();
        let (key, csr) = certs::generate_key_and_csr("agent").unwrap();
        let cert = ca
            .sign_agent_csr(&csr, "ap_1", now, std::time::Duration::from_secs(3600))
            .unwrap();
        let f = Files {
            key: dir.path().join("agent.key"),
            cert: dir.path().join("agent.crt"),
            ca: dir.path().join("ca.crt"),
            trail: dir.path().join("audit.jsonl"),
            _dir: dir,
        };
        std::fs::write(&f.key, key.expose()).unwrap();
        std::fs::write(&f.cert, cert).unwrap();
        std::fs::write(&f.ca, ca.cert_pem()).unwrap();
        f
    }

    async fn write(f: &Files, n: usize) {
        let signer = HeadSigner::load(&f.key, &f.cert, "ap_1", &f.trail).unwrap();
        let log =
            AuditLog::open_with_heads(&f.trail, Some("ap_1".into()), &mut |_| {}, Some(signer))
                .unwrap();
        for i in 0..n {
            log.record_or_log(Entry::new(
                "sql.statement",
                "op",
                serde_json::json!({ "i": i }),
            ));
        }
        log.flush().await;
        log.seal().await;
    }

    fn verify_files(f: &Files) -> Result<AuditVerified, ApiError> {
        verify(&VerifyInputs::load(&f.trail, Some(&f.cert), Some(&f.ca), None).unwrap())
    }

    fn lines(f: &Files) -> Vec<String> {
        std::fs::read_to_string(&f.trail)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[tokio::test]
    async fn heads_every_hundred_records_and_at_the_end_verify_with_the_certificate() {
        let f = files();
        write(&f, 250).await;
        let v = verify_files(&f).unwrap();
        let heads = v.heads.unwrap();
        // A head after records 100 and 200 (each one record later in the trail), and at the end.
        assert_eq!(heads.heads, 3, "{heads:?}");
        assert_eq!(v.records, 253);
        assert_eq!(heads.last_head.unwrap().seq, 253);
        assert_eq!(heads.compared_with.len(), 1);
        // Sealing again with nothing new adds no head.
        write(&f, 0).await;
        assert_eq!(verify_files(&f).unwrap().records, 253);
    }

    #[tokio::test]
    async fn a_cut_tail_names_the_head_kept_beside_the_trail_and_start_up_keeps_it_aside() {
        let f = files();
        write(&f, 120).await;
        let all = lines(&f);
        let last = all.len() as i64;
        std::fs::write(
            &f.trail,
            all[..all.len() - 2]
                .iter()
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
        )
        .unwrap();
        let e = verify_files(&f).unwrap_err();
        assert_eq!(e.code, ErrorCode::AuditChainBroken);
        let details = e.details;
        assert_eq!(details["missing_head"]["seq"], last);
        assert!(e.message.contains("is missing"), "{}", e.message);

        // The agent starts again on the cut trail: the head is kept aside and stays named even
        // after new heads replace the head file.
        let signer = HeadSigner::load(&f.key, &f.cert, "ap_1", &f.trail).unwrap();
        let (missing, kept) = signer.check_trail_reaches(&f.trail).unwrap();
        assert_eq!(missing.seq, last);
        assert!(kept.exists());
        drop(signer);
        write(&f, 150).await;
        let e = verify_files(&f).unwrap_err();
        assert_eq!(e.details["missing_head"]["seq"], last);
        assert!(e.message.contains("kept aside"), "{}", e.message);
    }

    #[test]
    fn gateway_heads_are_anchored_only_under_the_pinned_key() {
        let f = files();
        let log = AuditLog::open(&f.trail, Some("ap_1".into())).unwrap();
        let anchors = GatewayAnchors::load(&f.ca);
        let (gateway, _) = RecordSigner::generate().unwrap();
        let (mallory, _) = RecordSigner::generate().unwrap();
        let head = |signer: &RecordSigner, seq: i64| {
            let now = Timestamp::now();
            SignedHead {
                trail: TrailSide::Gateway,
                appliance_id: None,
                seq,
                prev_hash: "ab".into(),
                time: now,
                signature: signer
                    .sign(&signed_bytes(TrailSide::Gateway, None, seq, "ab", &now))
                    .unwrap(),
                key: signer.public_key_b64(),
            }
        };
        // Nothing pinned: refused, not trusted silently.
        anchors.on_head(head(&gateway, 5), &log);
        // Pinned on first sight from the hello (an older enrollment), said in the trail.
        anchors.hello(Some(&gateway.public_key_b64()), &log);
        anchors.on_head(head(&gateway, 6), &log);
        anchors.on_head(head(&gateway, 6), &log);
        anchors.on_head(head(&mallory, 7), &log);
        anchors.hello(Some(&mallory.public_key_b64()), &log);
        log.record(Entry::new("flush", "t", serde_json::json!({})))
            .unwrap();
        let kinds: Vec<String> = lines(&f)
            .iter()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "audit.anchor_refused",
                "audit.gateway_key_pinned",
                "audit.anchor",
                "audit.anchor_refused",
                "audit.anchor_refused",
                "flush"
            ]
        );
        assert_eq!(
            std::fs::read_to_string(gateway_key_file(&f.ca))
                .unwrap()
                .trim(),
            gateway.public_key_b64()
        );
        // The anchor verifies under the pinned key; a trail without heads needs no head file.
        let v = verify_files(&f).unwrap();
        assert_eq!(v.heads.unwrap().anchors, 1);
    }
}
