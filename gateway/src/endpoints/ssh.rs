//! ssh endpoints: one SSH front end, the endpoint chosen by the presented key.

use super::LiveEndpoint;
use crate::server::Gateway;
use endpoint_types::{
    api::{ClientCredential, EndpointAccess},
    ApiError,
};
use std::sync::Arc;

/// Checks the credential sent with `create`.
pub fn validate(cred: Option<&ClientCredential>) -> Result<(), ApiError> {
    match cred {
        Some(ClientCredential::Ssh { .. }) => Ok(()),
        _ => Err(ApiError::invalid("this endpoint type needs a ssh credential").hint("create it with the postern CLI, which makes one")),
    }
}

/// What the endpoint's creator needs to write their client's files.
pub fn access(_gw: &Gateway, ep: &LiveEndpoint) -> Result<EndpointAccess, ApiError> {
    Err(ApiError::invalid(format!("{} endpoints are not available on this gateway yet", ep.endpoint_type)))
}

/// Serves the shared front end until shutdown.
pub async fn serve(gw: Arc<Gateway>, listener: tokio::net::TcpListener) {
    gw.shutdown.cancelled().await;
    drop(listener);
}
