//! The server certificate the vendor supplies (`tls_cert` / `tls_key` in the gateway config),
//! e.g. from a public CA, served instead of the one the gateway CA issues, and picked up when
//! the files change without a restart.
//!
//! At a handshake, at most once per `check_every`, the files' modification times are compared
//! with those last loaded; if either changed, the pair is read and parsed again. A pair that
//! does not parse or whose key is not the certificate's (a half-written renewal, say) is
//! refused with an error in the log, and the certificate already served stays until a good
//! pair replaces it. The check runs on the handshake's thread, so it is a `stat` of two files
//! at most every few seconds, and a parse only when they changed.

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

/// How often a handshake may look at the files.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServedCertError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} and {} are not a usable certificate and key: {reason}", cert.display(), key.display())]
    Invalid {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// Serves the pair in `cert` / `key`, reloaded on change.
#[derive(Debug)]
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    check_every: Duration,
    state: Mutex<State>,
    /// Each reload's outcome, for the vendor trail ([`record_reloads`]): the handshake that
    /// noticed the change cannot wait for the store.
    reloads: tokio::sync::watch::Sender<Option<Reload>>,
}

/// What one reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    Served { old: String, new: String },
    Refused { serving: String, reason: String },
}

#[derive(Debug)]
struct State {
    served: Arc<CertifiedKey>,
    /// Fingerprint of the served leaf, for the log.
    fingerprint: String,
    mtimes: (Option<SystemTime>, Option<SystemTime>),
    checked_at: Instant,
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, String), ServedCertError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| ServedCertError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let chain = read(cert)?;
    let key_pem = certs::Secret::new(read(key)?);
    let invalid = |reason: String| ServedCertError::Invalid {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason,
    };
    let served =
        certs::served_cert::certified_key(&chain, &key_pem).map_err(|e| invalid(e.to_string()))?;
    let fingerprint = certs::fingerprint_pem(&chain).map_err(|e| invalid(e.to_string()))?;
    Ok((served, fingerprint))
}

impl ReloadingCert {
    /// Loads the pair now: at start-up a bad pair is an error, not a silent fallback.
    pub fn load(
        cert: &Path,
        key: &Path,
        check_every: Duration,
    ) -> Result<ReloadingCert, ServedCertError> {
        let mtimes = (mtime(cert), mtime(key));
        let (served, fingerprint) = load(cert, key)?;
        tracing::info!(cert = %cert.display(), %fingerprint, "serving the supplied TLS certificate");
        Ok(ReloadingCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            check_every,
            state: Mutex::new(State {
                served,
                fingerprint,
                mtimes,
                checked_at: Instant::now(),
            }),
            reloads: tokio::sync::watch::channel(None).0,
        })
    }

    /// Each reload's outcome as it happens.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<Option<Reload>> {
        self.reloads.subscribe()
    }

    /// The fingerprint of the certificate served now.
    pub fn fingerprint(&self) -> String {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fingerprint
            .clone()
    }

    /// The certificate to serve at `now`, reloading first if the files changed and the last
    /// check is `check_every` old.
    pub fn current(&self, now: Instant) -> Arc<CertifiedKey> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if now.duration_since(st.checked_at) >= self.check_every {
            st.checked_at = now;
            let mtimes = (mtime(&self.cert), mtime(&self.key));
            if mtimes != st.mtimes {
                // Remembered even when the pair is bad: it is tried again once a file changes,
                // not at every handshake.
                st.mtimes = mtimes;
                match load(&self.cert, &self.key) {
                    Ok((served, fingerprint)) => {
                        tracing::info!(cert = %self.cert.display(), old = %st.fingerprint, new = %fingerprint, "reloaded the supplied TLS certificate");
                        self.reloads.send_replace(Some(Reload::Served {
                            old: st.fingerprint.clone(),
                            new: fingerprint.clone(),
                        }));
                        st.served = served;
                        st.fingerprint = fingerprint;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, serving = %st.fingerprint, "the replaced TLS certificate is unusable; still serving the previous one");
                        self.reloads.send_replace(Some(Reload::Refused {
                            serving: st.fingerprint.clone(),
                            reason: e.to_string(),
                        }));
                    }
                }
            }
        }
        st.served.clone()
    }
}

/// Records each reload in the vendor trail: `tls.cert_reloaded` (old and new fingerprint) or
/// `tls.cert_refused` (why, and the fingerprint still served). Runs until `stop`.
pub async fn record_reloads(
    mut reloads: tokio::sync::watch::Receiver<Option<Reload>>,
    audit: std::sync::Arc<dyn crate::ports::AuditSink>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = reloads.changed() => if changed.is_err() { return },
        }
        let reload = reloads.borrow_and_update().clone();
        let (kind, detail) = match reload {
            Some(Reload::Served { old, new }) => (
                "tls.cert_reloaded",
                serde_json::json!({ "old_fingerprint": old, "new_fingerprint": new }),
            ),
            Some(Reload::Refused { serving, reason }) => (
                "tls.cert_refused",
                serde_json::json!({ "serving_fingerprint": serving, "reason": reason }),
            ),
            None => continue,
        };
        audit
            .record(
                kind,
                "system:gateway",
                crate::audit::Subject::default(),
                detail,
            )
            .await;
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(ca: &certs::Ca) -> certs::Issued {
        ca.issue_server(
            &["127.0.0.1".to_string()],
            jiff::Timestamp::now(),
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    fn write(dir: &Path, issued: &certs::Issued) {
        std::fs::write(dir.join("tls.crt"), &issued.cert_pem).unwrap();
        std::fs::write(dir.join("tls.key"), issued.key_pem.expose()).unwrap();
    }

    fn bump(path: &Path, secs: u64) {
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn reloads_a_changed_pair_and_keeps_the_old_one_when_the_new_is_bad() {
        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::generate("public", jiff::Timestamp::now()).unwrap();
        let (one, two) = (pair(&ca), pair(&ca));
        write(dir.path(), &one);
        let (c, k) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let r = ReloadingCert::load(&c, &k, Duration::from_secs(2)).unwrap();
        let fp1 = certs::fingerprint_pem(&one.cert_pem).unwrap();
        assert_eq!(r.fingerprint(), fp1);
        let t0 = Instant::now();

        write(dir.path(), &two);
        bump(&c, 1);
        bump(&k, 1);
        // Not looked at before the interval has passed.
        r.current(t0);
        assert_eq!(r.fingerprint(), fp1);
        r.current(t0 + Duration::from_secs(3));
        let fp2 = certs::fingerprint_pem(&two.cert_pem).unwrap();
        assert_eq!(r.fingerprint(), fp2);

        // A key that is not the certificate's: refused, the served one stays.
        std::fs::write(&c, &one.cert_pem).unwrap();
        bump(&c, 5);
        r.current(t0 + Duration::from_secs(6));
        assert_eq!(r.fingerprint(), fp2);
        // Garbage too.
        std::fs::write(&c, "not a certificate").unwrap();
        bump(&c, 9);
        r.current(t0 + Duration::from_secs(9));
        assert_eq!(r.fingerprint(), fp2);

        // A bad pair at start-up is an error.
        assert!(ReloadingCert::load(&c, &k, Duration::from_secs(2)).is_err());
    }
}
