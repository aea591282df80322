//! SSH endpoints: one SSH listener for all of them. The engineer's key picks the endpoint;
//! each session channel is carried to the agent, which logs in to the VM's sshd as the
//! customer's configured user. See [`server`] (the russh handler), [`policy`] (what a
//! channel may ask for) and [`relay`] (channel ⇄ data stream, recording, audit).

pub mod host_key;
pub mod policy;
pub mod relay;
pub mod server;
pub mod teardown;

use super::{front_ends::FrontEndContext, LiveEndpoint};
use endpoint_types::{
    api::{ClientCredential, EndpointAccess},
    ApiError,
};
use russh::{
    keys::{PrivateKey, PublicKey},
    server::Config,
    MethodKind, MethodSet, Preferred,
};
use std::{borrow::Cow, net::SocketAddr, sync::Arc, time::Duration};
use tokio::net::{TcpListener, TcpStream};

/// At create: the credential must be one OpenSSH public key line.
pub fn validate(cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    let Some(ClientCredential::Ssh { public_key }) = cred else {
        return Err(ApiError::invalid(
            "an ssh endpoint needs the public half of the engineer's key",
        )
        .hint(
            "create ssh endpoints with the postern CLI, which makes the key pair on your machine",
        ));
    };
    let key = PublicKey::from_openssh(public_key.trim()).map_err(|e| {
        ApiError::invalid(format!(
            "the ssh public key is not a valid OpenSSH public key: {e}"
        ))
    })?;
    if key.algorithm() != russh::keys::Algorithm::Ed25519 {
        return Err(ApiError::invalid(format!(
            "ssh endpoint keys must be ed25519, not {}",
            key.algorithm()
        )));
    }
    Ok(())
}

fn host_key(data_dir: &std::path::Path) -> Result<PrivateKey, ApiError> {
    host_key::load_or_create(data_dir).map_err(|e| ApiError::internal(e.to_string()))
}

/// What the CLI needs to write the engineer's ssh config: where, as whom, and the host key to
/// pin. The user name is the endpoint id (any name works: the key decides).
pub fn access(ctx: &FrontEndContext, ep: &LiveEndpoint) -> Result<EndpointAccess, ApiError> {
    let key = host_key(&ctx.data_dir)?;
    let addr = ctx.addrs.ssh;
    Ok(EndpointAccess::Ssh {
        host: addr.ip().to_string(),
        port: addr.port(),
        user: ep.id.clone(),
        host_key: host_key::public_line(&key),
        alias: format!("postern-{}", ep.id),
    })
}

/// The algorithms offered: russh's safe defaults, with strict key exchange (the Terrapin
/// countermeasure, `kex-strict-s-v00@openssh.com`) always advertised.
pub fn preferred() -> Preferred {
    let mut kex: Vec<russh::kex::Name> = Preferred::DEFAULT.kex.to_vec();
    if !kex.contains(&russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER) {
        kex.push(russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER);
    }
    Preferred {
        kex: Cow::Owned(kex),
        ..Preferred::DEFAULT
    }
}

pub fn config(key: PrivateKey) -> Config {
    Config {
        server_id: russh::SshId::Standard(Cow::Borrowed("SSH-2.0-Postern")),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![key],
        preferred: preferred(),
        max_auth_attempts: 6,
        // Idle sessions stay (an engineer reading a log); keepalives find dead clients.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 3,
        nodelay: true,
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        ..Config::default()
    }
}

pub async fn serve(ctx: Arc<FrontEndContext>, listener: TcpListener) {
    let key = match host_key(&ctx.data_dir) {
        Ok(k) => k,
        Err(e) => return tracing::error!("ssh front end disabled: {}", e.message),
    };
    let config = Arc::new(config(key));
    while let Some((tcp, client, permit)) =
        crate::admission::accept_admitted(&ctx.doors.ssh, &ctx.shutdown, &listener).await
    {
        ctx.tasks
            .spawn(connection(ctx.clone(), config.clone(), tcp, client, permit));
    }
}

/// One client connection: authentication within `[limits] handshake_timeout`, then until the client leaves
/// or the endpoint ends (retire, expiry, revocation), which disconnects it at once.
async fn connection(
    ctx: Arc<FrontEndContext>,
    config: Arc<Config>,
    tcp: TcpStream,
    client: SocketAddr,
    permit: crate::admission::Permit,
) {
    let _ = tcp.set_nodelay(true);
    let (auth_tx, auth_rx) = tokio::sync::oneshot::channel();
    let handler = server::Conn::new(ctx.clone(), client, auth_tx);
    let grace = tokio::time::sleep(ctx.limits.handshake_timeout);
    tokio::pin!(grace);
    let running = tokio::select! {
        r = russh::server::run_stream(config, tcp, handler) => r,
        _ = &mut grace => return tracing::debug!(%client, "ssh client sent no banner in time"),
        _ = ctx.shutdown.cancelled() => return,
    };
    let mut running = match running {
        Ok(r) => r,
        Err(e) => return tracing::debug!(%client, error = %e, "ssh handshake failed"),
    };
    let handle = running.handle();
    let disconnect = |why: String| {
        let handle = handle.clone();
        async move {
            let _ = handle
                .disconnect(russh::Disconnect::ByApplication, why, "en".into())
                .await;
        }
    };
    let ep = tokio::select! {
        r = auth_rx => match r {
            Ok(ep) => ep,
            Err(_) => {
                let _ = (&mut running).await;
                return;
            }
        },
        _ = &mut running => return,
        _ = &mut grace => {
            tracing::info!(%client, "ssh client did not authenticate in time");
            disconnect("authentication timed out".into()).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut running).await;
            return;
        }
        _ = ctx.shutdown.cancelled() => {
            disconnect("gateway shutting down".into()).await;
            return;
        }
    };
    // Authenticated: past the unauthenticated part.
    drop(permit);
    tokio::select! {
        _ = &mut running => {}
        _ = ep.cancel.cancelled() => {
            disconnect(format!("postern: endpoint {} {}", ep.id, ep.end_reason().as_str())).await;
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut running).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_kex_is_offered() {
        assert!(preferred()
            .kex
            .contains(&russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER));
        assert!(preferred()
            .cipher
            .contains(&russh::cipher::CHACHA20_POLY1305));
    }

    #[test]
    fn validate_wants_one_ed25519_public_key() {
        let key = host_key::generate("x").unwrap();
        let line = host_key::public_line(&key);
        assert!(validate(Some(&ClientCredential::Ssh {
            public_key: line.clone()
        }))
        .is_ok());
        assert!(validate(None).is_err());
        assert!(validate(Some(&ClientCredential::Ssh {
            public_key: "ssh-ed25519 AAAA".into()
        }))
        .is_err());
        assert!(validate(Some(&ClientCredential::Postgres {
            scram_verifier: "x".into()
        }))
        .is_err());
        // The key an engineer offers finds the endpoint whose line it is, and no other's.
        use crate::endpoints::credential::{CredentialKey, ParsedCredential};
        let parsed = ParsedCredential::parse(
            "ep_x",
            endpoint_types::resource::EndpointType::Ssh,
            &ClientCredential::Ssh { public_key: line },
        )
        .unwrap();
        assert_eq!(
            CredentialKey::of_ssh_key(key.public_key()),
            Some(parsed.key.clone())
        );
        assert_ne!(
            CredentialKey::of_ssh_key(host_key::generate("y").unwrap().public_key()),
            Some(parsed.key)
        );
    }

    #[test]
    fn a_key_finds_its_endpoint_only_while_it_is_live() {
        use crate::endpoints::{
            credential::test_credentials::ssh,
            front_ends::fakes::{endpoint_row, Parts},
        };
        use endpoint_types::{api::EndpointState, resource::EndpointType};
        let parts = Parts::new();
        let (cred, key) = ssh();
        let ep = parts.go_live(&endpoint_row(
            "ep_s",
            EndpointType::Ssh,
            EndpointState::Active,
            Some(cred),
        ));
        let found = server::endpoint_for_key(&parts.endpoints, key.public_key()).unwrap();
        assert!(Arc::ptr_eq(&found, &ep));
        let stranger = host_key::generate("z").unwrap();
        assert!(server::endpoint_for_key(&parts.endpoints, stranger.public_key()).is_none());

        // Past its expiry it opens nothing, even before its timer has taken it out.
        let (cred, late_key) = ssh();
        let mut row = endpoint_row(
            "ep_late",
            EndpointType::Ssh,
            EndpointState::Active,
            Some(cred),
        );
        row.expires_at = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
        parts.go_live(&row);
        assert!(server::endpoint_for_key(&parts.endpoints, late_key.public_key()).is_none());

        parts.retire("ep_s");
        assert!(server::endpoint_for_key(&parts.endpoints, key.public_key()).is_none());
    }
}
