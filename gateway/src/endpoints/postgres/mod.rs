//! postgres endpoints: one Postgres wire-protocol front end for all of them (TLS with the
//! gateway certificate, SCRAM-SHA-256 against the endpoint's verifier, the user name being the
//! endpoint id), one QUIC data stream per session to the agent, which logs in to the real
//! database as the endpoint's ephemeral role. Every statement is audited on the way through.

mod session;

use super::{front_ends::FrontEndContext, LiveEndpoint};
use endpoint_types::{
    api::{ClientCredential, EndpointAccess},
    pgwire::CancelKey,
    resource::ResourceScope,
    ApiError, ErrorCode,
};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Checks the credential sent with `create`: a well-formed SCRAM-SHA-256 verifier.
pub fn validate(cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    match cred {
        Some(ClientCredential::Postgres { scram_verifier }) => {
            certs::scram::Verifier::parse(scram_verifier)
                .map(|_| ())
                .map_err(|e| {
                    ApiError::invalid(format!("the postgres credential is not usable: {e}"))
                        .hint("create the endpoint with the postern CLI, which makes one")
                })
        }
        _ => Err(
            ApiError::invalid("this endpoint type needs a postgres credential")
                .hint("create it with the postern CLI, which makes one"),
        ),
    }
}

/// The database the endpoint serves, from the scope the agent reported.
pub fn database_of(ctx: &FrontEndContext, ep: &LiveEndpoint) -> Option<String> {
    match ctx.scope_of(ep) {
        Some(ResourceScope::Postgres { database, .. }) => Some(database),
        _ => None,
    }
}

/// What the endpoint's creator needs to write the connection string.
pub fn access(ctx: &FrontEndContext, ep: &LiveEndpoint) -> Result<EndpointAccess, ApiError> {
    let database = database_of(ctx, ep).ok_or_else(|| {
        ApiError::new(
            ErrorCode::ApplianceOffline,
            format!(
                "appliance {} is offline, so endpoint {} has no database yet",
                ep.appliance_id, ep.id
            ),
        )
        .hint("run `postern ops endpoint get` again once the appliance is back")
    })?;
    let addr = ctx.addrs.postgres;
    let host = if addr.ip().is_unspecified() {
        "localhost".to_string()
    } else {
        addr.ip().to_string()
    };
    Ok(EndpointAccess::Postgres {
        tls_server_name: host.clone(),
        host,
        port: addr.port(),
        database,
        user: ep.id.clone(),
        ca_pem: ctx.server_trust_pem(),
    })
}

/// Where a client's cancel key leads: the session it was handed to.
#[derive(Debug, Clone)]
struct CancelTarget {
    endpoint: Arc<LiveEndpoint>,
    session_id: String,
}

/// State shared by all connections of the front end.
struct Front {
    tls: tokio_rustls::TlsAcceptor,
    /// `tls-server-end-point` of our certificate, for SCRAM-SHA-256-PLUS.
    end_point: Option<Vec<u8>>,
    cancels: Mutex<HashMap<CancelKey, CancelTarget>>,
}

impl Front {
    fn new(ctx: &FrontEndContext) -> Result<Front, String> {
        let id = &ctx.server_identity;
        let alpn = vec![b"postgresql".to_vec()];
        let config = match &ctx.served_cert {
            Some(served) => certs::server_config_with_resolver(
                served.clone(),
                None,
                certs::ClientAuth::None,
                alpn,
            ),
            None => certs::server_config(
                &id.cert_pem,
                &id.key_pem,
                None,
                certs::ClientAuth::None,
                alpn,
            ),
        }
        .map_err(|e| e.to_string())?;
        use rustls_pki_types::pem::PemObject;
        // A supplied certificate can change between handshakes, so channel binding (which
        // hashes the served certificate) is not offered with one: clients use SCRAM-SHA-256.
        let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
            .next()
            .and_then(Result::ok)
            .filter(|_| ctx.served_cert.is_none());
        Ok(Front {
            tls: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            end_point: leaf.and_then(|der| certs::scram::tls_server_end_point(&der)),
            cancels: Mutex::new(HashMap::new()),
        })
    }

    fn cancels(&self) -> std::sync::MutexGuard<'_, HashMap<CancelKey, CancelTarget>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves the shared front end until shutdown.
pub async fn serve(ctx: Arc<FrontEndContext>, listener: tokio::net::TcpListener) {
    let front = match Front::new(&ctx) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the postgres front end");
            return ctx.shutdown.cancelled().await;
        }
    };
    while let Some((tcp, client, permit)) =
        crate::admission::accept_admitted(&ctx.doors.postgres, &ctx.shutdown, &listener).await
    {
        ctx.tasks.spawn(session::connection(
            ctx.clone(),
            front.clone(),
            tcp,
            client,
            permit,
        ));
    }
}

#[cfg(test)]
mod tests;
