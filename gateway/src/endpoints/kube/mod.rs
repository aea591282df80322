//! kubectl endpoints: an HTTPS front end speaking the Kubernetes API, scoped by namespace,
//! resource and verb.
//!
//! One listener serves every kubectl endpoint. TLS requires a client certificate signed by the
//! gateway CA; its public key names the endpoint (the key of the CSR the operator's CLI sent
//! with `create`). The endpoint is looked up again on every request, so a retired or expired
//! endpoint's certificate stops working even on a kept-alive connection, and every live
//! connection of an endpoint is dropped the moment its cancellation token fires.

mod forward;
mod op_records;

pub use op_records::on_op_record;

use super::{
    credential::CredentialKey, front_ends::FrontEndContext, session::SessionSlot, EndpointRegistry,
    LiveEndpoint,
};
use endpoint_types::{
    api::{ClientCredential, EndpointAccess},
    kube_request::KubeScope,
    resource::{EndpointType, ResourceScope},
    ApiError, ErrorCode,
};
use jiff::Timestamp;
use std::{net::SocketAddr, sync::Arc};
use tokio::net::{TcpListener, TcpStream};

/// Checks the credential sent with `create`: a CSR whose signature verifies.
pub fn validate(cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    match cred {
        Some(ClientCredential::Kubectl { csr_pem }) => {
            certs::verified_csr_spki(csr_pem).map(|_| ()).map_err(|e| {
                ApiError::invalid(format!("the kubectl credential is not a usable CSR: {e}"))
                    .hint("create the endpoint with the postern CLI, which makes one")
            })
        }
        _ => Err(
            ApiError::invalid("a kubectl endpoint needs a kube credential (a CSR)")
                .hint("create it with the postern CLI, which makes one"),
        ),
    }
}

/// What the endpoint's creator needs for a kubeconfig: the front end, the CA, and the
/// operator's CSR signed for exactly the endpoint's lifetime.
pub fn access(ctx: &FrontEndContext, ep: &LiveEndpoint) -> Result<EndpointAccess, ApiError> {
    let Some(ClientCredential::Kubectl { csr_pem }) = &ep.credential else {
        return Err(ApiError::internal(format!(
            "endpoint {} has no kube credential",
            ep.id
        )));
    };
    let cert_pem = ctx
        .ca
        .sign_client_csr(
            csr_pem,
            &format!("postern:endpoint:{}", ep.id),
            Timestamp::now(),
            ep.expires_at,
        )
        .map_err(|e| ApiError::internal(format!("cannot sign the kubectl credential: {e}")))?;
    let addr = ctx.addrs.kube;
    let tls_server_name = if addr.ip().is_loopback() || addr.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    let namespace = match ctx.scope_of(ep) {
        Some(ResourceScope::Kubernetes { namespaces, .. }) => namespaces.first().cloned(),
        _ => None,
    };
    Ok(EndpointAccess::Kubectl {
        server: format!("https://{addr}"),
        tls_server_name,
        ca_pem: ctx.server_trust_pem(),
        cert_pem,
        namespace,
        cluster: format!("postern-{}", ep.id),
    })
}

/// Serves the shared front end until shutdown.
pub async fn serve(ctx: Arc<FrontEndContext>, listener: TcpListener) {
    let tls = match tls_config(&ctx) {
        Ok(c) => tokio_rustls::TlsAcceptor::from(Arc::new(c)),
        Err(e) => {
            tracing::error!(error = %e, "kube front end disabled: no TLS configuration");
            return ctx.shutdown.cancelled().await;
        }
    };
    while let Some((tcp, client, permit)) =
        crate::admission::accept_admitted(&ctx.doors.kube, &ctx.shutdown, &listener).await
    {
        ctx.tasks
            .spawn(connection(ctx.clone(), tls.clone(), tcp, client, permit));
    }
}

fn tls_config(ctx: &FrontEndContext) -> Result<rustls::ServerConfig, certs::CertError> {
    let id = &ctx.server_identity;
    let mut c = match &ctx.served_cert {
        Some(served) => certs::server_config_with_resolver(
            served.clone(),
            Some(ctx.ca.cert_pem()),
            certs::ClientAuth::Required,
            vec![b"http/1.1".to_vec()],
        )?,
        None => certs::server_config(
            &id.cert_pem,
            &id.key_pem,
            Some(ctx.ca.cert_pem()),
            certs::ClientAuth::Required,
            vec![b"http/1.1".to_vec()],
        )?,
    };
    // No resumption: every connection presents its certificate, which is then mapped to a live
    // endpoint. (Requests are re-checked anyway; this keeps the mapping simple.)
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(c)
}

async fn connection(
    ctx: Arc<FrontEndContext>,
    tls: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    client: SocketAddr,
    permit: crate::admission::Permit,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(ctx.limits.handshake_timeout, tls.accept(tcp)).await;
    // The client certificate was verified in the handshake: past the unauthenticated part.
    drop(permit);
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return tracing::debug!(%client, error = %e, "kube front end: TLS handshake failed")
        }
        Err(_) => return tracing::debug!(%client, "kube front end: TLS handshake timed out"),
    };
    let ep = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| endpoint_of(&ctx.endpoints, c));
    let Some(ep) = ep else {
        tracing::info!(%client, "kube front end: certificate of no live endpoint");
        return forward::refuse_all(stream, forward::Refusal::Unauthenticated).await;
    };
    let slot = match SessionSlot::claim(&ep, ctx.limits.sessions_per_endpoint) {
        Ok(s) => s,
        Err(e) => {
            let session_id = super::session::new_session_id();
            super::session::deny(&*ctx.audit, &ep, &session_id, client, &e).await;
            return forward::refuse_all(stream, forward::Refusal::TooMany(e.message)).await;
        }
    };
    // Names arrive canonical (the agent resolved them through discovery). Reads-only for a
    // resource without `impersonate` is left to the agent, which holds the credential: it
    // refuses such writes and the forwarder records its reason here as a denial too.
    let scope = match ctx.scope_of(&ep) {
        Some(ResourceScope::Kubernetes {
            namespaces,
            resources,
            verbs,
            ..
        }) => KubeScope::compile(&namespaces, &resources, &verbs).ok(),
        _ => None,
    };
    let Some(scope) = scope else {
        let e = ApiError::new(
            ErrorCode::ApplianceOffline,
            format!(
                "appliance {} is offline or reports no kubernetes scope for {}",
                ep.appliance_id, ep.resource_id
            ),
        );
        return forward::refuse_all(stream, forward::Refusal::Unavailable(e.message)).await;
    };
    forward::serve_connection(ctx, ep, scope, stream, client, slot).await;
}

/// The live kubectl endpoint whose CSR carried the public key of this (verified) certificate.
fn endpoint_of(live: &EndpointRegistry, cert_der: &[u8]) -> Option<Arc<LiveEndpoint>> {
    let key = CredentialKey::of_certificate(EndpointType::Kubectl, cert_der)?;
    live.by_credential(&key)
}

/// Whether the endpoint still admits requests (looked up on every request).
fn still_live(live: &EndpointRegistry, ep: &LiveEndpoint) -> bool {
    !ep.cancel.is_cancelled() && Timestamp::now() < ep.expires_at && live.get(&ep.id).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoints::{
        credential::test_credentials::csr,
        front_ends::fakes::{endpoint_row, Parts},
    };
    use endpoint_types::api::EndpointState;

    #[test]
    fn a_certificate_finds_its_live_endpoint_until_it_ends() {
        let parts = Parts::new();
        let (cred, csr_pem) = csr(EndpointType::Kubectl);
        let row = endpoint_row(
            "ep_k",
            EndpointType::Kubectl,
            EndpointState::Active,
            Some(cred),
        );
        let ep = parts.go_live(&row);
        let cert = parts.sign(&csr_pem, "ep_k");
        let found = endpoint_of(&parts.endpoints, &cert).expect("the endpoint of the certificate");
        assert!(Arc::ptr_eq(&found, &ep));
        assert!(still_live(&parts.endpoints, &ep));

        // Another key signed by the same CA opens nothing.
        let (_, other_csr) = csr(EndpointType::Kubectl);
        assert!(endpoint_of(&parts.endpoints, &parts.sign(&other_csr, "ep_k")).is_none());

        // Retired: out of the registry and cancelled, so neither lookup admits it.
        parts.retire("ep_k");
        assert!(endpoint_of(&parts.endpoints, &cert).is_none());
        assert!(!still_live(&parts.endpoints, &ep));
    }

    #[test]
    fn an_endpoint_past_its_expiry_admits_no_request_even_before_its_timer_fires() {
        let parts = Parts::new();
        let (cred, _) = csr(EndpointType::Kubectl);
        let mut row = endpoint_row(
            "ep_k",
            EndpointType::Kubectl,
            EndpointState::Active,
            Some(cred),
        );
        row.expires_at = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(1);
        let ep = parts.go_live(&row);
        assert!(!still_live(&parts.endpoints, &ep));
    }

    #[test]
    fn access_names_the_front_end_the_ca_and_the_reported_namespace() {
        let parts = Parts::new();
        let ctx = parts.context(4);
        let (cred, _) = csr(EndpointType::Kubectl);
        let ep = parts.go_live(&endpoint_row(
            "ep_k",
            EndpointType::Kubectl,
            EndpointState::Active,
            Some(cred),
        ));
        parts.agents.report(
            "ap_1",
            "res_1",
            ResourceScope::Kubernetes {
                namespaces: vec!["shop".into(), "jobs".into()],
                resources: vec!["pods".into()],
                verbs: vec!["get".into()],
                impersonate: false,
            },
        );
        let EndpointAccess::Kubectl {
            server,
            tls_server_name,
            ca_pem,
            cert_pem,
            namespace,
            cluster,
        } = access(&ctx, &ep).unwrap()
        else {
            panic!("not a kubectl access");
        };
        assert_eq!(server, "https://127.0.0.1:6443");
        assert_eq!(tls_server_name, "localhost");
        assert_eq!(ca_pem, parts.ca.cert_pem());
        assert!(cert_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(namespace.as_deref(), Some("shop"));
        assert_eq!(cluster, "postern-ep_k");
    }
}
