//! Proof of teardown: when an endpoint ends, the agent checks that it really is gone, signs
//! what it found with the appliance key and writes it as `endpoint.teardown` into the
//! customer's trail, then sends it to the gateway for the vendor's
//! ([`endpoint_types::teardown`]).
//!
//! What is checked: every session was cut and has ended; a new session is refused by the
//! agent's own table (for a kubernetes endpoint: a request under its certificate); for
//! PostgreSQL the role is gone from `pg_roles` with no backend left in `pg_stat_activity`; for
//! SSH the VM teardown ([`crate::ssh_teardown`]) ran to its end. Each check says how long it
//! took.
//!
//! Nothing here is lost to a disconnection or a restart. The endpoints this agent owes a proof
//! (every live one) and the proofs the gateway has not acknowledged are kept in
//! `teardowns.json` next to the agent's key. After the first endpoint sync of a connection,
//! an owed endpoint the gateway no longer lists ended while the agent was away: it is torn
//! down and proved then ([`Proofs::ended_meanwhile`]). Proofs go out on every connection until
//! the gateway answers [`ToAgent::TeardownAck`](endpoint_types::frame::ToAgent::TeardownAck)
//! (it stores them idempotently by endpoint id), and again after [`RESEND_AFTER`] unanswered.

use crate::{
    audit::Entry,
    grants::{LiveSessions, Removed},
    sessions::{authorize, Sessions},
};
use certs::record_signature::RecordSigner;
use endpoint_types::{
    frame::{EndpointGrant, StreamOpen, ToGateway},
    resource::{CloseReason, EndpointType},
    ssh_scope::SshTeardown,
    teardown::{check, SignedTeardown, TeardownCheck, TeardownProof, TEARDOWN_KIND},
    ApiError,
};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{sync::mpsc, task::JoinHandle};

/// How long cut sessions get to end before the proof says some are left.
const SESSIONS_GONE_WAIT: Duration = Duration::from_secs(10);
/// Bounds waiting for a type's own teardown (the SSH one is bounded at 60 s itself).
const UNDO_WAIT: Duration = Duration::from_secs(90);
/// A proof sent on this connection and not acknowledged is sent again after this long.
pub const RESEND_AFTER: Duration = Duration::from_secs(30);
/// How often the sender looks for proofs due again.
const RESEND_CHECK: Duration = Duration::from_secs(5);
/// Proofs kept for the gateway; past this the oldest is dropped (it stays in the customer's
/// trail) so a gateway that never answers cannot fill the disk.
const MAX_UNACKED: usize = 4096;
/// Endpoints owed a proof (live endpoints, which the gateway bounds far lower).
const MAX_OWED: usize = 16_384;

#[derive(Debug, thiserror::Error)]
pub enum ProofsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a teardown state file: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the agent key cannot sign teardown proofs: {0}")]
    Key(String),
}

/// What `teardowns.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    #[serde(default)]
    owed: Vec<EndpointGrant>,
    #[serde(default)]
    unacked: Vec<SignedTeardown>,
}

#[derive(Debug)]
struct Unacked {
    signed: SignedTeardown,
    /// When it last went out on the current connection.
    sent_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    owed: BTreeMap<String, EndpointGrant>,
    unacked: BTreeMap<String, Unacked>,
    /// Order the proofs were made in, to drop the oldest past the bound.
    order: Vec<String>,
}

/// The endpoints this agent owes a teardown proof, and the proofs not yet acknowledged.
#[derive(Debug)]
pub struct Proofs {
    state: Mutex<State>,
    path: PathBuf,
    signer: crate::appliance_key::ApplianceKey,
    appliance_id: String,
    wake: tokio::sync::Notify,
}

/// What a type's own teardown is doing, for the proof to wait on.
#[derive(Debug, Default)]
pub struct Undoing {
    pub postgres: Option<JoinHandle<()>>,
    pub ssh: Option<JoinHandle<SshTeardown>>,
}

/// The state file for an agent whose key is `key_file`.
pub fn state_path(key_file: &Path) -> PathBuf {
    key_file.with_file_name("teardowns.json")
}

impl Proofs {
    /// Loads what an earlier run left (nothing, the first time) and the signing key.
    pub fn open(path: PathBuf, key_pem: &str, appliance_id: &str) -> Result<Proofs, ProofsError> {
        let signer =
            RecordSigner::from_pem(key_pem).map_err(|e| ProofsError::Key(e.to_string()))?;
        let key = crate::appliance_key::ApplianceKey::new(signer, String::new());
        Proofs::open_with_key(path, key, appliance_id)
    }

    /// [`Proofs::open`] signing with the shared appliance key (swapped by a renewal).
    pub fn open_with_key(
        path: PathBuf,
        signer: crate::appliance_key::ApplianceKey,
        appliance_id: &str,
    ) -> Result<Proofs, ProofsError> {
        let saved: Saved = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ProofsError::Parse {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(source) => return Err(ProofsError::Read { path, source }),
        };
        let mut state = State::default();
        for g in saved.owed {
            state.owed.insert(g.endpoint_id.clone(), g);
        }
        for s in saved.unacked {
            state.order.push(s.proof.endpoint_id.clone());
            state.unacked.insert(
                s.proof.endpoint_id.clone(),
                Unacked {
                    signed: s,
                    sent_at: None,
                },
            );
        }
        Ok(Proofs {
            state: Mutex::new(state),
            path,
            signer,
            appliance_id: appliance_id.to_string(),
            wake: tokio::sync::Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the state file (a new file renamed over the old, so a crash leaves one whole).
    fn save(&self, st: &State) {
        let saved = Saved {
            owed: st.owed.values().cloned().collect(),
            unacked: st.unacked.values().map(|u| u.signed.clone()).collect(),
        };
        let tmp = self.path.with_extension("json.tmp");
        let written = serde_json::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| certs::write_private(&tmp, &bytes))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, "cannot keep the teardown state; an endpoint that ends while the agent is stopped may go unproved");
        }
    }

    /// Endpoints owed a proof from an earlier run (their SSH teardown is owed too).
    pub fn owed(&self) -> Vec<EndpointGrant> {
        self.state().owed.values().cloned().collect()
    }

    /// An endpoint became live here: its end will be proved.
    pub fn owe(&self, grant: &EndpointGrant) {
        let mut st = self.state();
        if st.owed.len() >= MAX_OWED && !st.owed.contains_key(&grant.endpoint_id) {
            tracing::error!(endpoint = %grant.endpoint_id, "too many live endpoints to keep; this one's end is proved only if the agent stays up");
            return;
        }
        if st.owed.get(&grant.endpoint_id) != Some(grant) {
            st.owed.insert(grant.endpoint_id.clone(), grant.clone());
            self.save(&st);
        }
    }

    /// After the gateway's endpoint sync: endpoints owed a proof that it no longer lists (or
    /// lists past their expiry by our clock) ended while this agent was away. The gateway
    /// does not say why; past its expiry it expired, else it counts as retired.
    pub fn ended_meanwhile(&self, listed: &[EndpointGrant], now: Timestamp) -> Vec<Removed> {
        let st = self.state();
        st.owed
            .values()
            .filter(|g| {
                !listed
                    .iter()
                    .any(|e| e.endpoint_id == g.endpoint_id && e.expires_at > now)
            })
            .map(|g| {
                let expired = g.expires_at <= now
                    || listed
                        .iter()
                        .any(|e| e.endpoint_id == g.endpoint_id && e.expires_at <= now);
                Removed {
                    endpoint_id: g.endpoint_id.clone(),
                    reason: if expired {
                        CloseReason::Expired
                    } else {
                        CloseReason::Retired
                    },
                    grant: g.clone(),
                    sessions: LiveSessions::default(),
                }
            })
            .collect()
    }

    /// Takes the endpoint off the owed list; false if it was not on it (proved already).
    fn take_owed(&self, endpoint_id: &str) -> bool {
        let mut st = self.state();
        let had = st.owed.remove(endpoint_id).is_some();
        if had {
            self.save(&st);
        }
        had
    }

    /// Keeps a signed proof until the gateway acknowledges it, and sends it.
    fn queue(&self, signed: SignedTeardown) {
        let mut st = self.state();
        let id = signed.proof.endpoint_id.clone();
        st.order.retain(|o| o != &id);
        st.order.push(id.clone());
        st.unacked.insert(
            id,
            Unacked {
                signed,
                sent_at: None,
            },
        );
        while st.unacked.len() > MAX_UNACKED && !st.order.is_empty() {
            let oldest = st.order.remove(0);
            st.unacked.remove(&oldest);
            tracing::warn!(endpoint = %oldest, "dropping the oldest teardown proof the gateway never acknowledged (it stays in the customer's trail)");
        }
        self.save(&st);
        drop(st);
        self.wake.notify_one();
    }

    /// The gateway stored (or, with `refused`, will never store) the proof for `endpoint_id`.
    pub fn acked(&self, endpoint_id: &str, refused: Option<&ApiError>) {
        if let Some(e) = refused {
            tracing::warn!(endpoint = %endpoint_id, code = %e.code, "the gateway refused a teardown proof: {}", e.message);
        }
        let mut st = self.state();
        if st.unacked.remove(endpoint_id).is_some() {
            st.order.retain(|o| o != endpoint_id);
            self.save(&st);
        }
    }

    /// Proofs not yet acknowledged, by endpoint id.
    pub fn unacked(&self) -> Vec<String> {
        self.state().unacked.keys().cloned().collect()
    }

    /// A new connection: every unacknowledged proof goes out on it, and each new one as it is
    /// made, until the connection's outbox closes.
    pub fn connected(self: &Arc<Self>, outbox: &mpsc::Sender<ToGateway>) {
        for u in self.state().unacked.values_mut() {
            u.sent_at = None;
        }
        let (proofs, outbox) = (self.clone(), outbox.clone());
        tokio::spawn(async move { proofs.send_while_connected(outbox).await });
    }

    async fn send_while_connected(&self, outbox: mpsc::Sender<ToGateway>) {
        loop {
            let due: Vec<SignedTeardown> = {
                let mut st = self.state();
                let now = Instant::now();
                st.unacked
                    .values_mut()
                    .filter(|u| {
                        u.sent_at
                            .is_none_or(|t| now.duration_since(t) >= RESEND_AFTER)
                    })
                    .map(|u| {
                        u.sent_at = Some(now);
                        u.signed.clone()
                    })
                    .collect()
            };
            for signed in due {
                // Waits for room: a proof is never dropped for a full queue.
                if outbox.send(ToGateway::TeardownProof(signed)).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(RESEND_CHECK) => {}
                () = outbox.closed() => return,
            }
        }
    }

    /// The appliance key was swapped (a renewed certificate is in use from this connection
    /// on): proofs still waiting are signed again, since the gateway checks each with the
    /// certificate of the connection that delivers it.
    pub fn resign_unacked(&self) {
        let mut st = self.state();
        let mut changed = false;
        for u in st.unacked.values_mut() {
            if let Some(s) = self.sign(u.signed.proof.clone()) {
                u.signed = s;
                changed = true;
            }
        }
        if changed {
            self.save(&st);
        }
    }

    fn sign(&self, proof: TeardownProof) -> Option<SignedTeardown> {
        let signed = self
            .signer
            .with(|signer, _| certs::teardown_proof::sign_teardown(signer, proof));
        match signed {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot sign a teardown proof");
                None
            }
        }
    }
}

/// An endpoint ended (`offline`: while the agent was away, found on resync): once the type's
/// own teardown in `undoing` is done, checks it is gone and proves it. Runs on a task.
pub fn prove(ctx: &Sessions, removed: &Removed, offline: bool, undoing: Undoing) {
    if !ctx.proofs.take_owed(&removed.endpoint_id) {
        return;
    }
    let (ctx, removed) = (ctx.clone(), removed.clone());
    let ended_at = Timestamp::now();
    tokio::spawn(async move {
        let checks = run_checks(&ctx, &removed, undoing).await;
        let proof = TeardownProof {
            endpoint_id: removed.endpoint_id.clone(),
            appliance_id: ctx.proofs.appliance_id.clone(),
            endpoint_type: removed.grant.endpoint_type,
            resource_id: removed.grant.resource_id.clone(),
            reason: removed.reason,
            ended_at,
            proved_at: Timestamp::now(),
            offline,
            checks,
        };
        let Some(signed) = ctx.proofs.sign(proof) else {
            return;
        };
        tracing::info!(endpoint = %removed.endpoint_id, all_passed = signed.proof.all_passed(), offline, "endpoint teardown proved");
        let detail = serde_json::to_value(&signed).unwrap_or_default();
        let entry = Entry::new(TEARDOWN_KIND, ctx.audit.agent_actor(), detail)
            .endpoint(removed.endpoint_id.clone());
        if let Err(e) = ctx.audit.write(entry).await {
            tracing::error!(endpoint = %removed.endpoint_id, error = %e, "cannot write the teardown proof into the customer's trail");
        }
        ctx.proofs.queue(signed);
    });
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

async fn run_checks(ctx: &Sessions, removed: &Removed, undoing: Undoing) -> Vec<TeardownCheck> {
    let mut checks = vec![sessions_cut(&removed.sessions).await, refused(ctx, removed)];
    match removed.grant.endpoint_type {
        EndpointType::Postgres => {
            checks.extend(postgres_gone(ctx, removed, undoing.postgres).await)
        }
        EndpointType::Ssh => checks.push(ssh_cleaned(undoing.ssh).await),
        EndpointType::Kubectl | EndpointType::Tcp => {}
    }
    checks
}

/// Every session cut has ended (its task and every handle it held are gone). The gateway
/// may have cut a session's stream before its close reached the agent, so the detail also
/// says how many the endpoint served.
async fn sessions_cut(sessions: &LiveSessions) -> TeardownCheck {
    let started = Instant::now();
    let at_end = sessions.count();
    let mut left = at_end;
    while left > 0 && started.elapsed() < SESSIONS_GONE_WAIT {
        tokio::time::sleep(Duration::from_millis(20)).await;
        left = sessions.count();
    }
    TeardownCheck {
        name: check::SESSIONS_CUT.into(),
        passed: left == 0,
        took_ms: elapsed_ms(started),
        detail: format!(
            "{} session(s) served; {at_end} still running at the end were cut; {left} left",
            sessions.admitted()
        ),
    }
}

/// A session of the endpoint asked for now is refused by the same decision every stream
/// goes through ([`authorize`]). For kubernetes this is what a request under the endpoint's
/// client certificate reaches at the appliance.
fn refused(ctx: &Sessions, removed: &Removed) -> TeardownCheck {
    let started = Instant::now();
    let probe = StreamOpen {
        endpoint_id: removed.endpoint_id.clone(),
        session_id: "teardown-probe".into(),
        resource_id: removed.grant.resource_id.clone(),
        operator: "postern-agent".into(),
        client_addr: String::new(),
    };
    let decision = {
        let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        authorize(&live, &ctx.config, &probe, Timestamp::now()).map(|_| ())
    };
    let name = if removed.grant.endpoint_type == EndpointType::Kubectl {
        check::KUBE_CERTIFICATE_REFUSED
    } else {
        check::NEW_SESSIONS_REFUSED
    };
    let (passed, detail) = match decision {
        Err(e) => (true, format!("refused with {}: {}", e.code, e.message)),
        Ok(()) => (false, "a new session would still be admitted".to_string()),
    };
    TeardownCheck {
        name: name.into(),
        passed,
        took_ms: elapsed_ms(started),
        detail,
    }
}

/// The role was dropped (waiting for the drop under way), then asked of the database itself.
async fn postgres_gone(
    ctx: &Sessions,
    removed: &Removed,
    dropping: Option<JoinHandle<()>>,
) -> Vec<TeardownCheck> {
    let started = Instant::now();
    if let Some(h) = dropping {
        let _ = tokio::time::timeout(UNDO_WAIT, h).await;
    }
    let role = crate::postgres::role::role_name(&removed.endpoint_id);
    let presence = match ctx.config.resource(&removed.grant.resource_id) {
        Some(resource) => match crate::postgres::role::Admin::new(resource) {
            Ok(admin) => admin.role_presence(&role).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        None => Err(format!(
            "resource {:?} is no longer in agent.toml",
            removed.grant.resource_id
        )),
    };
    let took_ms = elapsed_ms(started);
    let made = |name: &str, passed: bool, detail: String| TeardownCheck {
        name: name.into(),
        passed,
        took_ms,
        detail,
    };
    match presence {
        Ok((exists, backends)) => vec![
            made(
                check::PG_ROLE_GONE,
                !exists,
                format!(
                    "role {role}: {} row(s) in pg_roles",
                    if exists { 1 } else { 0 }
                ),
            ),
            made(
                check::PG_BACKENDS_GONE,
                backends == 0,
                format!("role {role}: {backends} backend(s) in pg_stat_activity"),
            ),
        ],
        Err(e) => vec![
            made(
                check::PG_ROLE_GONE,
                false,
                format!("cannot ask the database: {e}"),
            ),
            made(
                check::PG_BACKENDS_GONE,
                false,
                format!("cannot ask the database: {e}"),
            ),
        ],
    }
}

/// The VM teardown as the login user: what it ended, or why it did not run to its end.
async fn ssh_cleaned(teardown: Option<JoinHandle<SshTeardown>>) -> TeardownCheck {
    let started = Instant::now();
    let report = match teardown {
        Some(h) => tokio::time::timeout(UNDO_WAIT, h)
            .await
            .ok()
            .and_then(Result::ok),
        None => None,
    };
    let (passed, detail) = match report {
        None => (
            false,
            "the VM teardown did not report (not owed, or it did not finish)".to_string(),
        ),
        Some(r) => match (&r.error, &r.skipped) {
            (Some(e), _) => (false, e.clone()),
            (None, Some(why)) => (true, format!("skipped: {why}")),
            (None, None) => (
                true,
                format!(
                    "as {}: {} process(es) ended, {} crontab line(s), {} at job(s), {} unit(s) removed",
                    r.user,
                    r.killed.len(),
                    r.crontab.len(),
                    r.at_jobs.len(),
                    r.units.len()
                ),
            ),
        },
    };
    TeardownCheck {
        name: check::SSH_VM_CLEANUP.into(),
        passed,
        took_ms: elapsed_ms(started),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        let (_, pem) = RecordSigner::generate().unwrap();
        pem.expose().to_string()
    }

    fn grant(id: &str, expires_in: i64) -> EndpointGrant {
        EndpointGrant {
            phase: endpoint_types::phase::operate(),
            endpoint_id: id.into(),
            endpoint_type: EndpointType::Kubectl,
            resource_id: "aws_eks_cluster.main".into(),
            expires_at: Timestamp::now() + jiff::SignedDuration::from_secs(expires_in),
            grant_id: None,
            signed_decision: None,
        }
    }

    fn signed(p: &Proofs, id: &str) -> SignedTeardown {
        p.sign(TeardownProof {
            endpoint_id: id.into(),
            appliance_id: "apl_1".into(),
            endpoint_type: EndpointType::Kubectl,
            resource_id: "aws_eks_cluster.main".into(),
            reason: CloseReason::Retired,
            ended_at: Timestamp::now(),
            proved_at: Timestamp::now(),
            offline: true,
            checks: vec![],
        })
        .unwrap()
    }

    #[test]
    fn owed_endpoints_and_unacknowledged_proofs_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teardowns.json");
        let key = key();
        let p = Proofs::open(path.clone(), &key, "apl_1").unwrap();
        p.owe(&grant("ep_a", 600));
        p.owe(&grant("ep_b", 600));
        p.queue(signed(&p, "ep_old"));
        drop(p);
        let p = Proofs::open(path.clone(), &key, "apl_1").unwrap();
        let owed: Vec<String> = p.owed().into_iter().map(|g| g.endpoint_id).collect();
        assert_eq!(owed, vec!["ep_a", "ep_b"]);
        assert_eq!(p.unacked(), vec!["ep_old"]);
        // The gateway lists ep_a only: ep_b ended meanwhile, as retired (not yet expired).
        let gone = p.ended_meanwhile(&[grant("ep_a", 600)], Timestamp::now());
        assert_eq!(gone.len(), 1);
        assert_eq!(
            (gone[0].endpoint_id.as_str(), gone[0].reason),
            ("ep_b", CloseReason::Retired)
        );
        // Listed but past its expiry by our clock: it expired.
        let gone = p.ended_meanwhile(&[grant("ep_a", -1), grant("ep_b", 600)], Timestamp::now());
        assert_eq!(
            gone.iter()
                .map(|r| (r.endpoint_id.as_str(), r.reason))
                .collect::<Vec<_>>(),
            vec![("ep_a", CloseReason::Expired)]
        );
        assert!(p.take_owed("ep_b"));
        assert!(!p.take_owed("ep_b"), "an endpoint is proved once");
        p.acked("ep_old", None);
        drop(p);
        let p = Proofs::open(path, &key, "apl_1").unwrap();
        assert!(p.unacked().is_empty());
        assert_eq!(p.owed().len(), 1);
    }

    #[tokio::test]
    async fn proofs_go_out_on_each_connection_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let p = Arc::new(Proofs::open(dir.path().join("t.json"), &key(), "apl_1").unwrap());
        p.queue(signed(&p, "ep_1"));
        let next = |rx: &mut mpsc::Receiver<ToGateway>| match rx.try_recv() {
            Ok(ToGateway::TeardownProof(s)) => Some(s.proof.endpoint_id),
            _ => None,
        };
        let (tx, mut rx) = mpsc::channel(8);
        p.connected(&tx);
        tokio::time::timeout(Duration::from_secs(5), async {
            while rx.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(next(&mut rx).as_deref(), Some("ep_1"));
        // The connection drops before the ack: the next one carries it again.
        drop((tx, rx));
        let (tx, mut rx) = mpsc::channel(8);
        p.connected(&tx);
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert!(matches!(got, Some(ToGateway::TeardownProof(s)) if s.proof.endpoint_id == "ep_1"));
        p.acked("ep_1", None);
        assert!(p.unacked().is_empty());
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_silent_reset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("teardowns.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            Proofs::open(path, &key(), "apl_1"),
            Err(ProofsError::Parse { .. })
        ));
    }
}
