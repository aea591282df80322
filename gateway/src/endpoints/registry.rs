//! The live endpoints of this gateway, by id and by client credential. An endpoint enters
//! when it goes live (created, approved, restored at start-up) with its credential parsed
//! once, and leaves when it ends; the front ends find the endpoint a client's credential
//! belongs to with one hash lookup.

use super::credential::{CredentialKey, ParsedCredential};
use crate::store::EndpointRow;
use endpoint_types::{
    api::ClientCredential,
    resource::{CloseReason, EndpointType},
};
use jiff::Timestamp;
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
    },
};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct LiveEndpoint {
    pub id: String,
    pub endpoint_type: EndpointType,
    pub appliance_id: String,
    pub resource_id: String,
    pub operator: String,
    pub expires_at: Timestamp,
    pub grant_id: Option<String>,
    /// The public half of the client credential, as the operator's CLI sent it (the kubectl
    /// and tcp CSRs are signed from it when the creator fetches the endpoint).
    pub credential: Option<ClientCredential>,
    /// The phase it runs under: the appliance uses that phase's identity at the target.
    pub phase: endpoint_types::control::GrantLevel,
    /// The same credential parsed for the front ends; None without a usable credential, and
    /// then no client can authenticate to the endpoint.
    parsed: Option<ParsedCredential>,
    pub cancel: CancellationToken,
    pub live_sessions: AtomicU64,
    end_reason: Mutex<Option<CloseReason>>,
}

impl LiveEndpoint {
    /// The live endpoint of a stored row, its credential parsed here once.
    pub fn new(row: &EndpointRow, cancel: CancellationToken) -> LiveEndpoint {
        let parsed = row.credential.as_ref().and_then(|c| {
            ParsedCredential::parse(&row.id, row.endpoint_type, c)
                .inspect_err(|e| {
                    tracing::error!(endpoint = %row.id, error = %e, "endpoint credential unusable: no client can connect")
                })
                .ok()
        });
        LiveEndpoint {
            id: row.id.clone(),
            endpoint_type: row.endpoint_type,
            appliance_id: row.appliance_id.clone(),
            resource_id: row.resource_id.clone(),
            operator: row.created_by.clone(),
            expires_at: row.expires_at,
            grant_id: row.grant_id.clone(),
            credential: row.credential.clone(),
            phase: row.phase,
            parsed,
            cancel,
            live_sessions: AtomicU64::new(0),
            end_reason: Mutex::new(None),
        }
    }

    /// What the endpoint's front end finds it by.
    pub fn credential_key(&self) -> Option<&CredentialKey> {
        self.parsed.as_ref().map(|p| &p.key)
    }

    /// A postgres endpoint's SCRAM verifier.
    pub fn scram_verifier(&self) -> Option<&certs::scram::Verifier> {
        self.parsed.as_ref().and_then(|p| p.scram.as_ref())
    }

    pub fn end_reason(&self) -> CloseReason {
        self.end_reason
            .lock()
            .map(|r| r.unwrap_or(CloseReason::Interrupted))
            .unwrap_or(CloseReason::Interrupted)
    }

    pub(super) fn end(&self, reason: CloseReason) {
        if let Ok(mut r) = self.end_reason.lock() {
            r.get_or_insert(reason);
        }
        self.cancel.cancel();
    }
}

#[derive(Debug, Default)]
struct Maps {
    by_id: HashMap<String, Arc<LiveEndpoint>>,
    by_credential: HashMap<CredentialKey, Arc<LiveEndpoint>>,
}

impl Maps {
    /// Drops `ep`'s credential entry if it is `ep`'s (a refused duplicate never owned it).
    fn unindex(&mut self, ep: &Arc<LiveEndpoint>) {
        if let Some(key) = ep.credential_key() {
            if self
                .by_credential
                .get(key)
                .is_some_and(|held| Arc::ptr_eq(held, ep))
            {
                self.by_credential.remove(key);
            }
        }
    }
}

/// Why an endpoint was registered without its credential: another live endpoint holds it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the client credential of endpoint {endpoint} already belongs to live endpoint {holder}")]
pub struct CredentialTaken {
    pub endpoint: String,
    pub holder: String,
}

#[derive(Debug, Default)]
pub struct EndpointRegistry {
    live: RwLock<Maps>,
}

impl EndpointRegistry {
    fn read(&self) -> RwLockReadGuard<'_, Maps> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Maps> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveEndpoint>> {
        self.read().by_id.get(id).cloned()
    }

    /// The live endpoint a client credential belongs to.
    pub fn by_credential(&self, key: &CredentialKey) -> Option<Arc<LiveEndpoint>> {
        self.read().by_credential.get(key).cloned()
    }

    /// Registers a live endpoint. Its credential is indexed unless another live endpoint holds
    /// it already: then that one keeps it and this one is reachable by id only, so no client
    /// can reach it by a credential that is not its own alone (the error says which).
    pub(super) fn insert(&self, ep: Arc<LiveEndpoint>) -> Result<(), CredentialTaken> {
        let mut maps = self.write();
        if let Some(old) = maps.by_id.insert(ep.id.clone(), ep.clone()) {
            maps.unindex(&old);
        }
        let Some(key) = ep.credential_key() else {
            return Ok(());
        };
        if let Some(holder) = maps.by_credential.get(key) {
            return Err(CredentialTaken {
                endpoint: ep.id.clone(),
                holder: holder.id.clone(),
            });
        }
        maps.by_credential.insert(key.clone(), ep.clone());
        Ok(())
    }

    /// Unregisters an endpoint that ended: neither its id nor its credential finds it again.
    pub(super) fn remove(&self, id: &str) -> Option<Arc<LiveEndpoint>> {
        let mut maps = self.write();
        let ep = maps.by_id.remove(id)?;
        maps.unindex(&ep);
        Some(ep)
    }

    pub fn live_sessions(&self, id: &str) -> u64 {
        self.get(id)
            .map(|e| e.live_sessions.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Gateway shutdown: sessions end with reason `interrupted`; endpoints stay active in the
    /// store and come back on the next start.
    pub fn cut_all_for_shutdown(&self) {
        for ep in self.read().by_id.values() {
            ep.end(CloseReason::Interrupted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::credential::test_credentials;
    use endpoint_types::api::EndpointState;

    fn row(id: &str, t: EndpointType, credential: Option<ClientCredential>) -> EndpointRow {
        let now = Timestamp::now();
        EndpointRow {
            phase: endpoint_types::phase::operate(),
            id: id.into(),
            endpoint_type: t,
            appliance_id: "ap_1".into(),
            resource_id: "res".into(),
            state: EndpointState::Active,
            created_by: "bob".into(),
            created_by_id: None,
            created_at: now,
            expires_at: now
                .checked_add(jiff::SignedDuration::from_hours(1))
                .unwrap(),
            ended_at: None,
            address: None,
            sessions_total: 0,
            grant_id: Some("gr_1".into()),
            credential,
        }
    }

    fn live(id: &str, t: EndpointType, credential: ClientCredential) -> Arc<LiveEndpoint> {
        Arc::new(LiveEndpoint::new(
            &row(id, t, Some(credential)),
            CancellationToken::new(),
        ))
    }

    fn key_of(ep: &LiveEndpoint) -> CredentialKey {
        ep.credential_key().cloned().expect("a parsed credential")
    }

    #[test]
    fn each_type_is_found_by_its_credential_and_by_id() {
        let reg = EndpointRegistry::default();
        let (kube_cred, _) = test_credentials::csr(EndpointType::Kubectl);
        let (tcp_cred, _) = test_credentials::csr(EndpointType::Tcp);
        let (ssh_cred, ssh_key) = test_credentials::ssh();
        let eps = [
            live("ep_kube", EndpointType::Kubectl, kube_cred),
            live("ep_tcp", EndpointType::Tcp, tcp_cred),
            live("ep_ssh", EndpointType::Ssh, ssh_cred),
            live(
                "ep_pg",
                EndpointType::Postgres,
                test_credentials::postgres(),
            ),
        ];
        for ep in &eps {
            reg.insert(ep.clone()).unwrap();
        }
        for ep in &eps {
            let found = reg.by_credential(&key_of(ep)).expect("found by credential");
            assert!(Arc::ptr_eq(&found, ep), "{} found {}", ep.id, found.id);
            assert!(Arc::ptr_eq(&reg.get(&ep.id).unwrap(), ep));
        }
        // What a client presents: the key the engineer offers, the user name it logs in as.
        let offered = CredentialKey::of_ssh_key(ssh_key.public_key()).unwrap();
        assert_eq!(reg.by_credential(&offered).unwrap().id, "ep_ssh");
        let user = CredentialKey::of_postgres_user("ep_pg");
        assert_eq!(reg.by_credential(&user).unwrap().id, "ep_pg");
        assert!(reg
            .by_credential(&CredentialKey::of_postgres_user("ep_kube"))
            .is_none());
        // The postgres verifier is parsed, ready for SCRAM.
        assert!(reg.get("ep_pg").unwrap().scram_verifier().is_some());
        assert!(reg.get("ep_kube").unwrap().scram_verifier().is_none());
    }

    #[test]
    fn the_credential_of_an_ended_endpoint_finds_nothing() {
        let reg = EndpointRegistry::default();
        let (cred, _) = test_credentials::csr(EndpointType::Kubectl);
        let ended = live("ep_a", EndpointType::Kubectl, cred);
        let (cred, _) = test_credentials::ssh();
        let other = live("ep_b", EndpointType::Ssh, cred);
        reg.insert(ended.clone()).unwrap();
        reg.insert(other.clone()).unwrap();
        let removed = reg.remove("ep_a").expect("it was live");
        assert!(Arc::ptr_eq(&removed, &ended));
        assert!(reg.by_credential(&key_of(&ended)).is_none());
        assert!(reg.get("ep_a").is_none());
        assert!(reg.remove("ep_a").is_none(), "ended once");
        // The other endpoint is untouched.
        assert_eq!(reg.by_credential(&key_of(&other)).unwrap().id, "ep_b");
        let pg = live(
            "ep_pg",
            EndpointType::Postgres,
            test_credentials::postgres(),
        );
        reg.insert(pg).unwrap();
        reg.remove("ep_pg");
        assert!(reg
            .by_credential(&CredentialKey::of_postgres_user("ep_pg"))
            .is_none());
    }

    #[test]
    fn a_credential_already_held_stays_with_its_first_endpoint() {
        let reg = EndpointRegistry::default();
        let (cred, _) = test_credentials::csr(EndpointType::Kubectl);
        let first = live("ep_first", EndpointType::Kubectl, cred.clone());
        let second = live("ep_second", EndpointType::Kubectl, cred);
        reg.insert(first.clone()).unwrap();
        assert_eq!(
            reg.insert(second.clone()),
            Err(CredentialTaken {
                endpoint: "ep_second".into(),
                holder: "ep_first".into()
            })
        );
        let key = key_of(&first);
        assert_eq!(reg.by_credential(&key).unwrap().id, "ep_first");
        assert!(reg.get("ep_second").is_some(), "still registered by id");
        // The duplicate ending does not take the credential from its holder...
        reg.remove("ep_second");
        assert_eq!(reg.by_credential(&key).unwrap().id, "ep_first");
        // ...and once the holder ends, the credential finds nothing.
        reg.remove("ep_first");
        assert!(reg.by_credential(&key).is_none());
    }

    #[test]
    fn an_endpoint_without_a_usable_credential_is_live_but_unreachable() {
        let reg = EndpointRegistry::default();
        let legacy = Arc::new(LiveEndpoint::new(
            &row("ep_old", EndpointType::Tcp, None),
            CancellationToken::new(),
        ));
        let broken = Arc::new(LiveEndpoint::new(
            &row(
                "ep_broken",
                EndpointType::Ssh,
                Some(ClientCredential::Ssh {
                    public_key: "ssh-ed25519 AAAA".into(),
                }),
            ),
            CancellationToken::new(),
        ));
        // A credential of another type is not this endpoint's.
        let (kube_cred, _) = test_credentials::csr(EndpointType::Kubectl);
        let mismatched = live("ep_mismatch", EndpointType::Tcp, kube_cred);
        for ep in [&legacy, &broken, &mismatched] {
            reg.insert(ep.clone()).unwrap();
            assert!(ep.credential_key().is_none());
            assert!(reg.get(&ep.id).is_some());
        }
        assert!(reg
            .by_credential(&CredentialKey::of_postgres_user("ep_old"))
            .is_none());
    }

    #[test]
    fn registering_an_id_again_replaces_its_credential() {
        let reg = EndpointRegistry::default();
        let (a, _) = test_credentials::ssh();
        let (b, _) = test_credentials::ssh();
        let before = live("ep_x", EndpointType::Ssh, a);
        let after = live("ep_x", EndpointType::Ssh, b);
        reg.insert(before.clone()).unwrap();
        reg.insert(after.clone()).unwrap();
        assert!(reg.by_credential(&key_of(&before)).is_none());
        assert!(Arc::ptr_eq(
            &reg.by_credential(&key_of(&after)).unwrap(),
            &after
        ));
    }

    #[test]
    fn shutdown_cuts_sessions_but_keeps_endpoints_registered() {
        let reg = EndpointRegistry::default();
        let (cred, _) = test_credentials::ssh();
        let ep = live("ep_x", EndpointType::Ssh, cred);
        reg.insert(ep.clone()).unwrap();
        reg.cut_all_for_shutdown();
        assert!(ep.cancel.is_cancelled());
        assert_eq!(ep.end_reason(), CloseReason::Interrupted);
        assert!(reg.by_credential(&key_of(&ep)).is_some());
    }
}
