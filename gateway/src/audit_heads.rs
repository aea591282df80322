//! The vendor trail's signed heads (endpoint_types::trail_head): the gateway signs its chain
//! head with its audit key (made once, kept 0600 in the data dir like the CA) at least every
//! hundred records or minute and on shutdown, keeps the latest head in a file in the data dir
//! (outside the store, so a store cut short no longer matches it), and hands it to every
//! connected agent, which records it as an anchor in the customer trail. Agents' heads arrive
//! the other way and are recorded here as anchors. `postern audit verify` checks all of it.

use crate::audit::{sha256_hex, AuditLog, Subject};
use crate::store::{AuditPageQuery, StoreError};
use base64::{engine::general_purpose::STANDARD, Engine as _};
use certs::record_signature::{self, RecordSigner};
use endpoint_types::{
    api::{AuditRecord, AuditVerified, ChainVerifier},
    trail_head::{
        signed_bytes, Anchor, HeadFailure, HeadKeys, HeadVerifier, OutsideHead, SignedHead,
        TrailSide, HEAD_EVERY, HEAD_EVERY_RECORDS, HEAD_KIND,
    },
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Records per store read while verifying.
const VERIFY_PAGE: u32 = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("cannot use {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway audit key {}: {reason}", path.display())]
    Key { path: PathBuf, reason: String },
}

/// The private half of the gateway audit key, its public half, and the latest head.
pub fn key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-key.pem")
}
pub fn public_key_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-key.pub")
}
pub fn head_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-head.json")
}
/// A head the store no longer reached at start-up, kept so `audit verify` goes on failing
/// until someone has looked (and removed it).
pub fn missing_head_file(data_dir: &Path) -> PathBuf {
    data_dir.join("audit-head.missing.json")
}

pub struct AuditHeads {
    signer: RecordSigner,
    public_key: String,
    data_dir: PathBuf,
    latest: watch::Sender<Option<SignedHead>>,
    /// The seq of the last head record; held while a head is written, so heads are serial.
    last_head_seq: tokio::sync::Mutex<i64>,
}

impl std::fmt::Debug for AuditHeads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHeads")
            .field("public_key", &self.public_key)
            .finish_non_exhaustive()
    }
}

impl AuditHeads {
    /// Loads the audit key, or makes it on the first start (0600, beside the CA key).
    pub fn load_or_create(data_dir: &Path) -> Result<AuditHeads, HeadsError> {
        let path = key_file(data_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| HeadsError::Io { path, source }
        };
        let signer = match std::fs::read_to_string(&path) {
            Ok(pem) => {
                let pem = certs::Secret::new(pem);
                RecordSigner::from_pem(pem.expose()).map_err(|e| HeadsError::Key {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (signer, pem) = RecordSigner::generate().map_err(|e| HeadsError::Key {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                certs::write_private(&path, pem.expose().as_bytes()).map_err(io(&path))?;
                tracing::info!(file = %path.display(), "created the gateway audit key");
                signer
            }
            Err(source) => return Err(HeadsError::Io { path, source }),
        };
        let public_key = signer.public_key_b64();
        let pub_file = public_key_file(data_dir);
        std::fs::write(&pub_file, format!("{public_key}\n")).map_err(io(&pub_file))?;
        let last = read_head(&head_file(data_dir)).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the gateway's last signed head cannot be read; the next head replaces it");
            None
        });
        let last_seq = last.as_ref().map_or(0, |h| h.seq);
        Ok(AuditHeads {
            signer,
            public_key,
            data_dir: data_dir.to_path_buf(),
            latest: watch::channel(last).0,
            last_head_seq: tokio::sync::Mutex::new(last_seq),
        })
    }

    /// The public half, standard base64: what agents pin.
    pub fn public_key(&self) -> &str {
        &self.public_key
    }

    /// The latest signed head, as it changes: sent to every connected agent.
    pub fn subscribe(&self) -> watch::Receiver<Option<SignedHead>> {
        self.latest.subscribe()
    }

    /// At start-up: does the store still reach the head kept in the data dir? If not, records
    /// were cut off (or the store replaced) while the gateway was down: the head is kept aside
    /// so `audit verify` names it until someone has looked, and the finding is recorded.
    pub async fn check_store_reaches_head(&self, audit: &AuditLog) -> Result<(), StoreError> {
        let Some(head) = self.latest.borrow().clone() else {
            return Ok(());
        };
        let page = audit
            .store()
            .audit_page(&AuditPageQuery {
                after_seq: head.seq - 1,
                limit: 1,
                ..AuditPageQuery::default()
            })
            .await?;
        let found = page.records.first().filter(|r| r.seq == head.seq);
        if found.is_some_and(|r| is_that_head(r, &head)) {
            return Ok(());
        }
        let kept = missing_head_file(&self.data_dir);
        if !kept.exists() {
            if let Err(e) = write_head(&kept, &head) {
                tracing::error!(error = %e, "cannot keep the missing head aside");
            }
        }
        tracing::error!(seq = head.seq, file = %kept.display(), "the vendor audit trail no longer reaches the gateway's last signed head: records were cut off the end or the store was replaced while the gateway was down; `postern audit verify` names the head until the file is removed");
        self.latest.send_replace(None);
        *self.last_head_seq.lock().await = 0;
        audit
            .record(
                "audit.head_missing",
                "gateway",
                Subject::default(),
                serde_json::json!({ "head": head, "kept_in": kept }),
            )
            .await;
        Ok(())
    }

    /// Signs the chain's head as its next record, if anything was written since the last.
    pub async fn write_head(&self, audit: &AuditLog) -> Result<Option<SignedHead>, StoreError> {
        let mut last = self.last_head_seq.lock().await;
        if audit.head_seq().await <= *last {
            return Ok(None);
        }
        let mut made = None;
        let now = Timestamp::now();
        // Signed in the store's transaction, where the record's seq and prev_hash are fixed:
        // tens of microseconds once per hundred records.
        let record = audit
            .append_made(
                HEAD_KIND,
                "gateway",
                Subject::default(),
                now,
                |seq, prev| {
                    let bytes = signed_bytes(TrailSide::Gateway, None, seq, prev, &now);
                    let head = SignedHead {
                        trail: TrailSide::Gateway,
                        appliance_id: None,
                        seq,
                        prev_hash: prev.to_string(),
                        time: now,
                        // A failed signature leaves an empty one, which verification names.
                        signature: self.signer.sign(&bytes).unwrap_or_default(),
                        key: self.public_key.clone(),
                    };
                    let detail = serde_json::to_value(&head).unwrap_or_default();
                    made = Some(head);
                    detail
                },
            )
            .await?;
        *last = record.seq;
        if let Some(head) = &made {
            if let Err(e) = write_head(&head_file(&self.data_dir), head) {
                tracing::error!(error = %e, "cannot keep the gateway's signed head in the data dir; `audit verify` compares with the previous one");
            }
            self.latest.send_replace(Some(head.clone()));
        }
        Ok(made)
    }

    /// Writes a head every [`HEAD_EVERY_RECORDS`] records, and [`HEAD_EVERY`] after a record
    /// that no head covers yet, until shutdown (whose head [`RunningGateway`] writes last).
    ///
    /// [`RunningGateway`]: crate::server::RunningGateway
    pub async fn run(self: Arc<Self>, audit: Arc<AuditLog>, shutdown: CancellationToken) {
        let mut commits = audit.commits();
        let mut last_head_at = tokio::time::Instant::now();
        loop {
            let seq = *commits.borrow_and_update();
            let last = *self.last_head_seq.lock().await;
            let due = seq - last >= HEAD_EVERY_RECORDS;
            let waiting = seq > last;
            if due || (waiting && last_head_at.elapsed() >= HEAD_EVERY) {
                match self.write_head(&audit).await {
                    Ok(_) => last_head_at = tokio::time::Instant::now(),
                    Err(e) => {
                        // The trail is down; its writer brings it back. Try again shortly.
                        tracing::error!(error = %e, "cannot write the vendor trail's signed head");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                        }
                    }
                }
                continue;
            }
            let timer = async {
                if waiting {
                    tokio::time::sleep_until(last_head_at + HEAD_EVERY).await
                } else {
                    std::future::pending().await
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = commits.changed() => if changed.is_err() { return },
                () = timer => {}
            }
        }
    }

    /// Checks the chain, every head and anchor signature, and that the store still reaches
    /// the latest head this gateway signed (and any head given by the caller, say one that an
    /// agent anchored). `Ok(Err(_))` names the first record that fails, or the missing head.
    pub async fn verify(
        &self,
        audit: &AuditLog,
        extra: Vec<OutsideHead>,
    ) -> Result<Result<AuditVerified, ApiError>, StoreError> {
        let known = audit.head_seq().await;
        let mut outside = Vec::new();
        for (file, source) in [
            (head_file(&self.data_dir), "gateway's head file"),
            (
                missing_head_file(&self.data_dir),
                "head kept aside at start-up",
            ),
        ] {
            match read_head(&file) {
                Ok(Some(head)) => outside.push(OutsideHead {
                    head,
                    source: format!("{source} ({})", file.display()),
                }),
                Ok(None) => {}
                Err(e) => return Ok(Err(ApiError::internal(e.to_string()))),
            }
        }
        outside.extend(extra);
        let keys = GatewayKeys {
            public_key: self.public_key.clone(),
        };
        let mut chain = ChainVerifier::new();
        let mut heads = HeadVerifier::new(TrailSide::Gateway, outside);
        let mut query = AuditPageQuery {
            limit: VERIFY_PAGE,
            ..AuditPageQuery::default()
        };
        loop {
            let page = audit.store().audit_page(&query).await?;
            for r in &page.records {
                if let Err(seq) = chain.push(r, sha256_hex) {
                    return Ok(Err(chain_broken(seq)));
                }
                if let Err(f) = heads.push(r, &keys) {
                    return Ok(Err(head_failure(&f)));
                }
            }
            match page.next_after_seq {
                Some(seq) => query.after_seq = seq,
                None => break,
            }
        }
        let records = chain.records();
        let summary = match heads.finish() {
            Ok(s) => s,
            Err(f) => return Ok(Err(head_failure(&f))),
        };
        // Records this process wrote or saw since its last head are not covered by a head yet.
        if (records as i64) < known {
            return Ok(Err(chain_broken(records as i64 + 1)));
        }
        Ok(Ok(AuditVerified {
            ok: true,
            records,
            heads: Some(summary),
        }))
    }
}

fn is_that_head(r: &AuditRecord, head: &SignedHead) -> bool {
    r.kind == HEAD_KIND
        && serde_json::from_value::<SignedHead>(r.detail.clone())
            .is_ok_and(|h| h.signature == head.signature && h.prev_hash == head.prev_hash)
}

fn chain_broken(seq: i64) -> ApiError {
    ApiError::new(
        ErrorCode::AuditChainBroken,
        format!("the audit chain is broken at record {seq}"),
    )
    .hint(
        "a record was edited, inserted or deleted; compare with an earlier `postern audit export`",
    )
    .details(serde_json::json!({ "seq": seq }))
}

fn head_failure(f: &HeadFailure) -> ApiError {
    let mut details = serde_json::json!({ "seq": f.seq() });
    let hint = match f {
        HeadFailure::Record { .. } => {
            "a signed head or anchor was forged, moved or altered at this record"
        }
        HeadFailure::Missing { head, .. } => {
            details["missing_head"] = serde_json::to_value(head).unwrap_or_default();
            "records were cut off the end of the store or it was replaced; compare with an earlier `postern audit export` and with the gateway heads the customers' trails anchored"
        }
    };
    ApiError::new(
        ErrorCode::AuditChainBroken,
        format!("the vendor audit trail is broken: {}", f.message()),
    )
    .hint(hint)
    .details(details)
}

/// Own heads with the gateway audit key; anchors with the appliance certificate they carry.
struct GatewayKeys {
    public_key: String,
}

impl HeadKeys for GatewayKeys {
    fn own(&self, head: &SignedHead) -> Result<(), String> {
        if head.key != self.public_key {
            return Err("signed with another key than this gateway's audit key".into());
        }
        record_signature::verify_with_public_key(
            &self.public_key,
            &head.signed_bytes(),
            &head.signature,
        )
        .map_err(|e| e.to_string())
    }

    fn peer(&self, anchor: &Anchor) -> Result<(), String> {
        let cert = anchor
            .certificate
            .as_deref()
            .ok_or("the anchor holds no appliance certificate")?;
        let der = STANDARD
            .decode(cert)
            .map_err(|_| "the anchor's certificate is not base64".to_string())?;
        if certs::fingerprint(&der) != anchor.head.key {
            return Err("the anchor's certificate is not the one that signed".into());
        }
        record_signature::verify_with_cert(
            &der,
            &anchor.head.signed_bytes(),
            &anchor.head.signature,
        )
        .map_err(|e| e.to_string())
    }
}

/// An appliance's signed head, as its agent sent it over the tunnel: checked with the
/// certificate the connection was authenticated with, then recorded as an anchor (or, if it
/// does not verify, the refusal is recorded).
pub async fn on_agent_head(
    audit: &AuditLog,
    appliance_id: &str,
    peer_cert_der: Option<&[u8]>,
    head: SignedHead,
) {
    let actor = format!("agent:{appliance_id}");
    let checked = match peer_cert_der {
        None => Err("the connection has no client certificate".to_string()),
        Some(_) if head.trail != TrailSide::Appliance => Err("not an appliance head".into()),
        Some(_) if head.appliance_id.as_deref() != Some(appliance_id) => {
            Err("the head is of another appliance".into())
        }
        Some(der) if certs::fingerprint(der) != head.key => {
            Err("the head names another certificate than the connection's".into())
        }
        Some(der) => record_signature::verify_with_cert(der, &head.signed_bytes(), &head.signature)
            .map_err(|e| e.to_string()),
    };
    // Sent again after every hello: anchored once.
    if checked.is_ok() {
        match latest_anchor(audit, appliance_id).await {
            Ok(Some((_, a))) if a.head.seq == head.seq && a.head.signature == head.signature => {
                return
            }
            _ => {}
        }
    }
    match checked {
        Ok(()) => {
            let anchor = Anchor {
                head,
                certificate: peer_cert_der.map(|d| STANDARD.encode(d)),
            };
            audit
                .record(
                    endpoint_types::trail_head::ANCHOR_KIND,
                    &actor,
                    Subject::appliance(appliance_id),
                    serde_json::to_value(anchor).unwrap_or_default(),
                )
                .await;
        }
        Err(reason) => {
            tracing::warn!(appliance = %appliance_id, %reason, "refused an agent's signed trail head");
            audit
                .record(
                    "audit.anchor_refused",
                    &actor,
                    Subject::appliance(appliance_id),
                    serde_json::json!({ "reason": reason, "head": head }),
                )
                .await;
        }
    }
}

/// The latest head of `appliance_id` this gateway anchored, for `postern audit anchor`: the
/// customer gives it to `postern-agent audit verify --anchor` to check their trail against a
/// copy held outside the appliance.
pub async fn latest_anchor(
    audit: &AuditLog,
    appliance_id: &str,
) -> Result<Option<(i64, Anchor)>, StoreError> {
    let r = audit
        .store()
        .last_audit_of(appliance_id, endpoint_types::trail_head::ANCHOR_KIND)
        .await?;
    Ok(r.and_then(|r| {
        serde_json::from_value::<Anchor>(r.detail)
            .ok()
            .map(|a| (r.seq, a))
    }))
}

fn write_head(path: &Path, head: &SignedHead) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_vec(head).map_err(std::io::Error::other)?;
    certs::write_private(&tmp, &text)?;
    std::fs::rename(&tmp, path)
}

fn read_head(path: &Path) -> Result<Option<SignedHead>, HeadsError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HeadsError::Key {
                path: path.to_path_buf(),
                reason: format!("not a signed head: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(HeadsError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    async fn trail(n: usize) -> (tempfile::TempDir, Store, Arc<AuditLog>, AuditHeads) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_memory().await.unwrap();
        let audit = Arc::new(AuditLog::open(store.clone()).await.unwrap());
        let heads = AuditHeads::load_or_create(dir.path()).unwrap();
        for i in 0..n {
            audit
                .append(
                    "endpoint.created",
                    "alice",
                    Subject::appliance("ap_1"),
                    serde_json::json!({ "i": i }),
                    Timestamp::now(),
                )
                .await
                .unwrap();
        }
        (dir, store, audit, heads)
    }

    #[tokio::test]
    async fn heads_verify_and_the_store_must_reach_the_head_file() {
        let (dir, store, audit, heads) = trail(5).await;
        let head = heads.write_head(&audit).await.unwrap().unwrap();
        assert_eq!(head.seq, 6);
        assert!(
            heads.write_head(&audit).await.unwrap().is_none(),
            "nothing new, no head"
        );
        let v = heads.verify(&audit, vec![]).await.unwrap().unwrap();
        let summary = v.heads.unwrap();
        assert_eq!((v.records, summary.heads), (6, 1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_file(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // A second start keeps the key.
        let again = AuditHeads::load_or_create(dir.path()).unwrap();
        assert_eq!(again.public_key(), heads.public_key());

        // The head cut off the store (as SQL on its file would): a fresh process (whose
        // in-memory head is the store's) still names it, from the head file.
        store.truncate_audit_after(4).await.unwrap();
        let reopened = AuditLog::open(store.clone()).await.unwrap();
        let e = heads.verify(&reopened, vec![]).await.unwrap().unwrap_err();
        assert_eq!(e.details["seq"], 6);
        assert!(e.message.contains("head at seq 6"), "{}", e.message);
        assert!(e.details["missing_head"].is_object());

        // At start-up the finding is kept aside and recorded; later heads do not hide it.
        let reopened = Arc::new(reopened);
        heads.check_store_reaches_head(&reopened).await.unwrap();
        assert!(missing_head_file(dir.path()).exists());
        for _ in 0..3 {
            reopened
                .append(
                    "x",
                    "y",
                    Subject::default(),
                    serde_json::Value::Null,
                    Timestamp::now(),
                )
                .await
                .unwrap();
        }
        heads.write_head(&reopened).await.unwrap().unwrap();
        let e = heads.verify(&reopened, vec![]).await.unwrap().unwrap_err();
        assert!(e.message.contains("kept aside"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_forged_head_names_its_record() {
        let (dir, _store, audit, heads) = trail(3).await;
        // Another gateway key signs a head into this trail.
        let other_dir = tempfile::tempdir().unwrap();
        let other = AuditHeads::load_or_create(other_dir.path()).unwrap();
        other.write_head(&audit).await.unwrap().unwrap();
        let e = heads.verify(&audit, vec![]).await.unwrap().unwrap_err();
        assert_eq!(e.details["seq"], 4);
        drop(dir);
    }

    #[tokio::test]
    async fn agent_heads_are_anchored_only_with_the_connections_certificate() {
        let (_dir, store, audit, heads) = trail(1).await;
        let now = Timestamp::now();
        let ca = certs::Ca::generate("ca", now).unwrap();
        let (key, csr) = certs::generate_key_and_csr("agent").unwrap();
        let cert_pem = ca
            .sign_agent_csr(&csr, "ap_1", now, std::time::Duration::from_secs(3600))
            .unwrap();
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .unwrap()
            .to_vec();
        let signer = RecordSigner::from_pem(key.expose()).unwrap();
        let bytes = signed_bytes(TrailSide::Appliance, Some("ap_1"), 9, "ab", &now);
        let head = SignedHead {
            trail: TrailSide::Appliance,
            appliance_id: Some("ap_1".into()),
            seq: 9,
            prev_hash: "ab".into(),
            time: now,
            signature: signer.sign(&bytes).unwrap(),
            key: certs::fingerprint(&der),
        };
        on_agent_head(&audit, "ap_1", Some(&der), head.clone()).await;
        on_agent_head(&audit, "ap_1", Some(&der), head.clone()).await;
        on_agent_head(&audit, "ap_2", Some(&der), head.clone()).await;
        let mut forged = head.clone();
        forged.seq = 10;
        on_agent_head(&audit, "ap_1", Some(&der), forged).await;
        let kinds: Vec<String> = store
            .list_audit(0)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "endpoint.created",
                "audit.anchor",
                "audit.anchor_refused",
                "audit.anchor_refused"
            ]
        );
        let (seq, anchor) = latest_anchor(&audit, "ap_1").await.unwrap().unwrap();
        assert_eq!((seq, anchor.head), (2, head));
        let v = heads.verify(&audit, vec![]).await.unwrap().unwrap();
        assert_eq!(v.heads.unwrap().anchors, 1);
    }
}
