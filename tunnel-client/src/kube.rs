//! Kubernetes API requests through an endpoint, in the appliance.

use crate::{
    config::ResourceConfig,
    grants::Cut,
    sessions::{refuse, Sessions},
};
use endpoint_types::{frame::StreamOpen, ApiError};
use quinn::{RecvStream, SendStream};

pub fn validate_config(_resource: &ResourceConfig) -> Result<(), String> {
    Ok(())
}

pub async fn serve_stream(_ctx: &Sessions, open: StreamOpen, _resource: ResourceConfig, _cut: Cut, mut send: SendStream, _recv: RecvStream) {
    let e = ApiError::invalid(format!("endpoint {} is of a type this agent does not serve yet", open.endpoint_id))
        .hint("upgrade postern-agent in the appliance");
    refuse(&mut send, e).await;
}
