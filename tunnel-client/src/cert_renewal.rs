//! The agent renews its own certificate over the tunnel, two thirds into its lifetime
//! (`endpoint_types::cert_renewal`).
//!
//! A fresh key and CSR are made here in the appliance; only the CSR leaves. The answer's
//! certificate is checked (it certifies that key, names this appliance, is not expired) and
//! written next to the old pair without ever leaving a mismatched pair behind: both new files
//! are written and synced as `*.new` first, then renamed key first, certificate second, then
//! the directory synced; [`recover`] finishes a rename a crash interrupted. The replaced
//! certificate is appended to `<cert_file>.previous` so `audit verify` can still check the
//! heads its key signed.
//!
//! The renewed pair is used from the next connection on (the running one keeps the
//! certificate it was authenticated with): before each dial, [`CertRenewal::swap_if_renewed`]
//! moves every signer to the new key. The gateway keeps the old certificate working until the
//! first connection with the new one.

use crate::{appliance_key::ApplianceKey, audit::AuditLog, audit::Entry};
use certs::CertInfo;
use endpoint_types::{
    cert_renewal::{renew_at, retry_after, CertRenewAnswer, CertRenewRequest, RENEWED_KIND},
    frame::ToGateway,
    secret::Secret,
};
use jiff::Timestamp;
use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio::sync::{mpsc, oneshot};

/// How long to wait for the gateway's answer before asking again (with a new key).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RenewalError {
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
    #[error("certificate: {0}")]
    Cert(String),
    #[error("the gateway refused the renewal: {0}")]
    Refused(String),
    #[error("the gateway did not answer the renewal within {0:?}")]
    NoAnswer(Duration),
    #[error("the connection ended")]
    Disconnected,
}

/// One agent's renewal state, shared by its connections.
pub struct CertRenewal {
    key_file: PathBuf,
    cert_file: PathBuf,
    appliance_id: String,
    audit: AuditLog,
    /// What signs heads and proofs; swapped to the new key with the next connection.
    key: ApplianceKey,
    proofs: Arc<crate::teardown_proof::Proofs>,
    waiting: Mutex<Option<(u64, oneshot::Sender<CertRenewAnswer>)>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for CertRenewal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertRenewal")
            .field("cert_file", &self.cert_file)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CertRenewal {
    pub fn new(
        enrollment: &crate::config::Enrollment,
        audit: AuditLog,
        key: ApplianceKey,
        proofs: Arc<crate::teardown_proof::Proofs>,
    ) -> CertRenewal {
        CertRenewal {
            key_file: enrollment.key_file.clone(),
            cert_file: enrollment.cert_file.clone(),
            appliance_id: enrollment.appliance_id.clone(),
            audit,
            key,
            proofs,
            waiting: Mutex::new(None),
            next_id: AtomicU64::new(1),
        }
    }

    /// A connection whose gateway renews certificates: renew when due, while it lasts.
    pub fn connected(self: &Arc<Self>, outbox: &mpsc::Sender<ToGateway>) {
        let (me, outbox) = (self.clone(), outbox.clone());
        tokio::spawn(async move { me.run_while_connected(outbox).await });
    }

    /// The gateway's answer to a request.
    pub fn answer(&self, answer: CertRenewAnswer) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        match waiting.take() {
            Some((id, tx)) if id == answer.request_id => {
                let _ = tx.send(answer);
            }
            other => {
                tracing::warn!(request = answer.request_id, "a certificate renewal answer nobody waits for (a late answer to an abandoned request); ignored");
                *waiting = other;
            }
        }
    }

    /// Before a dial: if the certificate on disk is not the one signing (a renewal was
    /// installed), every signer takes the new key now and waiting proofs are signed again.
    /// True if it changed: the caller then builds its TLS configuration from the files again.
    pub fn swap_if_renewed(&self) -> bool {
        let Ok(cert_pem) = std::fs::read_to_string(&self.cert_file) else {
            return false;
        };
        let Ok(fp) = certs::fingerprint_pem(&cert_pem) else {
            return false;
        };
        if fp == self.key.fingerprint() {
            return false;
        }
        let key_pem = match std::fs::read_to_string(&self.key_file) {
            Ok(k) => Secret::new(k),
            Err(e) => {
                tracing::error!(file = %self.key_file.display(), error = %e, "cannot read the renewed key");
                return false;
            }
        };
        match self.key.replace(key_pem.expose(), &cert_pem) {
            Ok(()) => {
                self.proofs.resign_unacked();
                tracing::info!(fingerprint = %fp, "connecting with the renewed certificate");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the renewed key cannot sign; keeping the previous one");
                false
            }
        }
    }

    async fn run_while_connected(&self, outbox: mpsc::Sender<ToGateway>) {
        loop {
            let (cert_pem, info) = match self.current() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the agent certificate to schedule its renewal");
                    return;
                }
            };
            let due = renew_at(info.not_before, info.not_after);
            tracing::debug!(%due, not_after = %info.not_after, "certificate renewal scheduled");
            if !sleep_until(due, &outbox).await {
                return;
            }
            match self.attempt(&outbox, &cert_pem, &info).await {
                Ok(()) => {}
                Err(RenewalError::Disconnected) => return,
                Err(e) => {
                    let wait = retry_after(Timestamp::now(), info.not_after);
                    tracing::warn!(error = %e, retry_in = ?wait, not_after = %info.not_after, "the certificate was not renewed");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = outbox.closed() => return,
                    }
                }
            }
        }
    }

    fn current(&self) -> Result<(String, CertInfo), RenewalError> {
        let pem = read(&self.cert_file)?;
        let info = CertInfo::from_pem(&pem).map_err(|e| RenewalError::Cert(e.to_string()))?;
        Ok((pem, info))
    }

    async fn attempt(
        &self,
        outbox: &mpsc::Sender<ToGateway>,
        old_pem: &str,
        old: &CertInfo,
    ) -> Result<(), RenewalError> {
        let (key_pem, csr_pem) = certs::generate_key_and_csr(&self.appliance_id)
            .map_err(|e| RenewalError::Cert(e.to_string()))?;
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        *self.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((request_id, tx));
        let request = ToGateway::CertRenew(CertRenewRequest {
            request_id,
            csr_pem,
        });
        if outbox.send(request).await.is_err() {
            return Err(RenewalError::Disconnected);
        }
        let answer = tokio::select! {
            a = tokio::time::timeout(ANSWER_TIMEOUT, rx) => match a {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => return Err(RenewalError::Disconnected),
                Err(_) => return Err(RenewalError::NoAnswer(ANSWER_TIMEOUT)),
            },
            () = outbox.closed() => return Err(RenewalError::Disconnected),
        };
        let cert_pem = match (answer.cert_pem, answer.refused) {
            (Some(c), None) => c,
            (_, Some(e)) => {
                let hint = if e.hint.is_empty() {
                    String::new()
                } else {
                    format!(" (hint: {})", e.hint)
                };
                return Err(RenewalError::Refused(format!(
                    "{}: {}{hint}",
                    e.code, e.message
                )));
            }
            (None, None) => return Err(RenewalError::Refused("an empty answer".into())),
        };
        let new = check_issued(&key_pem, &cert_pem, &self.appliance_id, Timestamp::now())?;
        install(
            &self.key_file,
            &self.cert_file,
            &key_pem,
            &cert_pem,
            old_pem,
        )?;
        let mut detail = certs::renewed_detail(Some(old), &new);
        detail["in_use_from"] = "the next connection".into();
        self.audit
            .record_or_log(Entry::new(RENEWED_KIND, self.audit.agent_actor(), detail));
        tracing::info!(serial = %new.serial, not_after = %new.not_after, "renewed the agent certificate; the next connection uses it");
        Ok(())
    }
}

/// Sleeps until `due` (at once if past); false if the connection ended first.
async fn sleep_until(due: Timestamp, outbox: &mpsc::Sender<ToGateway>) -> bool {
    let wait = due
        .duration_since(Timestamp::now())
        .try_into()
        .unwrap_or(Duration::ZERO);
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = outbox.closed() => false,
    }
}

/// What the gateway sent must certify the key made here, for this appliance, for some time
/// yet: anything else would leave the agent unable to connect.
pub fn check_issued(
    key_pem: &Secret,
    cert_pem: &str,
    appliance_id: &str,
    now: Timestamp,
) -> Result<CertInfo, RenewalError> {
    let bad =
        |why: String| RenewalError::Cert(format!("the renewed certificate is unusable: {why}"));
    if !certs::key_matches_cert(key_pem.expose(), cert_pem).map_err(|e| bad(e.to_string()))? {
        return Err(bad("it does not certify the key made for it".into()));
    }
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let cn = certs::cert_common_name(&der).map_err(|e| bad(e.to_string()))?;
    if cn != appliance_id {
        return Err(bad(format!(
            "it names {cn:?}, not appliance {appliance_id}"
        )));
    }
    let info = CertInfo::from_der(&der).map_err(|e| bad(e.to_string()))?;
    if info.not_after <= now {
        return Err(bad(format!("it expired at {}", info.not_after)));
    }
    Ok(info)
}

use rustls_pki_types::pem::PemObject;

fn read(path: &Path) -> Result<String, RenewalError> {
    std::fs::read_to_string(path).map_err(|source| RenewalError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Where the certificates an appliance held before are kept: `<cert_file>.previous`.
pub fn previous_file(cert_file: &Path) -> PathBuf {
    with_suffix(cert_file, ".previous")
}

/// The certificates (DER) in `<cert_file>.previous`, oldest first; none if there is no file.
pub fn previous_certs(cert_file: &Path) -> Vec<Vec<u8>> {
    let Ok(bytes) = std::fs::read(previous_file(cert_file)) else {
        return Vec::new();
    };
    rustls_pki_types::CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

/// Replaces the key and certificate so that a crash at any point leaves a matching pair (or a
/// state [`recover`] completes): `*.new` written and synced, key renamed, certificate renamed,
/// directory synced. The old certificate is appended to `<cert_file>.previous` first.
pub fn install(
    key_file: &Path,
    cert_file: &Path,
    key_pem: &Secret,
    cert_pem: &str,
    old_cert_pem: &str,
) -> Result<(), RenewalError> {
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RenewalError::Write { path, source }
    };
    let previous = previous_file(cert_file);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&previous)
        .map_err(write_err(&previous))?;
    f.write_all(old_cert_pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write_err(&previous))?;
    let (key_new, cert_new) = (
        with_suffix(key_file, ".new"),
        with_suffix(cert_file, ".new"),
    );
    certs::write_private(&key_new, key_pem.expose().as_bytes()).map_err(write_err(&key_new))?;
    let mut f = std::fs::File::create(&cert_new).map_err(write_err(&cert_new))?;
    f.write_all(cert_pem.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(write_err(&cert_new))?;
    std::fs::rename(&key_new, key_file).map_err(write_err(key_file))?;
    std::fs::rename(&cert_new, cert_file).map_err(write_err(cert_file))?;
    for dir in [key_file.parent(), cert_file.parent()]
        .into_iter()
        .flatten()
    {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// At start-up: finishes an [`install`] a crash interrupted, so the key and certificate match.
/// Returns what it did, for the log.
pub fn recover(key_file: &Path, cert_file: &Path) -> Result<Option<&'static str>, RenewalError> {
    let (key_new, cert_new) = (
        with_suffix(key_file, ".new"),
        with_suffix(cert_file, ".new"),
    );
    if !cert_new.exists() {
        // A key.new alone was never paired with a certificate: nothing was replaced.
        let _ = std::fs::remove_file(&key_new);
        return Ok(None);
    }
    let matches = |key: &Path, cert: &Path| -> bool {
        match (std::fs::read_to_string(key), std::fs::read_to_string(cert)) {
            (Ok(k), Ok(c)) => certs::key_matches_cert(&k, &c).unwrap_or(false),
            _ => false,
        }
    };
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| RenewalError::Write {
            path: to.to_path_buf(),
            source,
        })
    };
    if matches(key_file, &cert_new) {
        rename(&cert_new, cert_file)?;
        return Ok(Some(
            "finished installing the renewed certificate (its key was in place)",
        ));
    }
    if matches(&key_new, &cert_new) {
        rename(&key_new, key_file)?;
        rename(&cert_new, cert_file)?;
        return Ok(Some("finished installing the renewed key and certificate"));
    }
    let _ = std::fs::remove_file(&cert_new);
    let _ = std::fs::remove_file(&key_new);
    Ok(Some("dropped a renewed certificate that matches no key"))
}

/// Why the agent cannot connect with its certificate at `now`, if it cannot.
pub fn expired(cert_file: &Path, now: Timestamp) -> Option<String> {
    let info = CertInfo::from_pem(&std::fs::read_to_string(cert_file).ok()?).ok()?;
    (info.not_after <= now).then(|| {
        format!(
            "the agent certificate {} expired at {} and was not renewed in time (the agent must be connected during the last third of its lifetime to renew it); the gateway refuses it",
            cert_file.display(),
            info.not_after
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pair(ca: &certs::Ca, id: &str, secs: u64) -> (Secret, String) {
        let (key, csr) = certs::generate_key_and_csr(id).unwrap();
        let cert = ca
            .sign_agent_csr(&csr, id, Timestamp::now(), Duration::from_secs(secs))
            .unwrap();
        (key, cert)
    }

    #[test]
    fn install_replaces_both_keeps_the_old_cert_and_the_key_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (kf, cf) = (dir.path().join("agent.key"), dir.path().join("agent.crt"));
        let ca = certs::Ca::generate("t", Timestamp::now()).unwrap();
        let (k1, c1) = pair(&ca, "ap_1", 60);
        std::fs::write(&kf, k1.expose()).unwrap();
        std::fs::write(&cf, &c1).unwrap();
        let (k2, c2) = pair(&ca, "ap_1", 60);
        install(&kf, &cf, &k2, &c2, &c1).unwrap();
        assert_eq!(std::fs::read_to_string(&kf).unwrap(), k2.expose());
        assert_eq!(std::fs::read_to_string(&cf).unwrap(), c2);
        let mode = std::fs::metadata(&kf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let prev = previous_certs(&cf);
        assert_eq!(prev.len(), 1);
        assert_eq!(
            certs::fingerprint(&prev[0]),
            certs::fingerprint_pem(&c1).unwrap()
        );
        assert!(!with_suffix(&kf, ".new").exists() && !with_suffix(&cf, ".new").exists());
        assert_eq!(recover(&kf, &cf).unwrap(), None);
    }

    #[test]
    fn recover_finishes_an_interrupted_install_either_way() {
        let dir = tempfile::tempdir().unwrap();
        let (kf, cf) = (dir.path().join("agent.key"), dir.path().join("agent.crt"));
        let ca = certs::Ca::generate("t", Timestamp::now()).unwrap();
        let (k1, c1) = pair(&ca, "ap_1", 60);
        let (k2, c2) = pair(&ca, "ap_1", 60);
        // Crash after the key was renamed, before the certificate was.
        std::fs::write(&kf, k2.expose()).unwrap();
        std::fs::write(&cf, &c1).unwrap();
        std::fs::write(with_suffix(&cf, ".new"), &c2).unwrap();
        assert!(recover(&kf, &cf).unwrap().is_some());
        assert!(certs::key_matches_cert(
            &std::fs::read_to_string(&kf).unwrap(),
            &std::fs::read_to_string(&cf).unwrap()
        )
        .unwrap());
        assert_eq!(std::fs::read_to_string(&cf).unwrap(), c2);
        // Crash before either rename.
        let (k3, c3) = pair(&ca, "ap_1", 60);
        std::fs::write(with_suffix(&kf, ".new"), k3.expose()).unwrap();
        std::fs::write(with_suffix(&cf, ".new"), &c3).unwrap();
        assert!(recover(&kf, &cf).unwrap().is_some());
        assert_eq!(std::fs::read_to_string(&cf).unwrap(), c3);
        assert_eq!(std::fs::read_to_string(&kf).unwrap(), k3.expose());
        let _ = k1;
    }

    #[test]
    fn an_issued_cert_must_certify_our_key_for_our_appliance() {
        let ca = certs::Ca::generate("t", Timestamp::now()).unwrap();
        let (k, c) = pair(&ca, "ap_1", 60);
        let info = check_issued(&k, &c, "ap_1", Timestamp::now()).unwrap();
        assert!(info.not_after > Timestamp::now());
        let (other_key, _) = pair(&ca, "ap_1", 60);
        assert!(check_issued(&other_key, &c, "ap_1", Timestamp::now()).is_err());
        assert!(check_issued(&k, &c, "ap_2", Timestamp::now()).is_err());
        let later = Timestamp::now() + jiff::SignedDuration::from_secs(120);
        assert!(check_issued(&k, &c, "ap_1", later).is_err());
    }

    #[test]
    fn an_expired_cert_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let cf = dir.path().join("agent.crt");
        let ca = certs::Ca::generate("t", Timestamp::now()).unwrap();
        let (_, c) = pair(&ca, "ap_1", 60);
        std::fs::write(&cf, &c).unwrap();
        assert!(expired(&cf, Timestamp::now()).is_none());
        let later = Timestamp::now() + jiff::SignedDuration::from_secs(120);
        assert!(expired(&cf, later).unwrap().contains("expired"));
    }
}
