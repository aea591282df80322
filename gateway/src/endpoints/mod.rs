//! Endpoints, shared by every endpoint type: the lifecycle service ([`Endpoints`]: create,
//! decide, retire, expire, restore), the registry of live endpoints and the front ends.
//!
//! One [`LiveEndpoint`] per active endpoint holds a cancellation token; every session of the
//! endpoint selects on it, so retire, expiry and revocation cut all sessions at once.

pub mod credential;
pub mod front_ends;
pub mod kube;
pub mod postgres;
mod refused;
mod registry;
mod service;
mod service_ending;
pub mod service_store;
pub mod session;
pub mod ssh;
mod tcp;

pub use registry::{CredentialTaken, EndpointRegistry, LiveEndpoint};
pub use service::{EndpointDeps, Endpoints, FrontEndPort, Listening};

use endpoint_types::{
    duration::{format_duration, TTL_MAX, TTL_MIN},
    frame::EndpointGrant,
    ApiError,
};
use std::time::Duration;

impl LiveEndpoint {
    pub fn grant(&self) -> EndpointGrant {
        EndpointGrant {
            endpoint_id: self.id.clone(),
            endpoint_type: self.endpoint_type,
            resource_id: self.resource_id.clone(),
            expires_at: self.expires_at,
            grant_id: self.grant_id.clone(),
            signed_decision: None,
            phase: self.phase,
        }
    }
}

pub fn validate_ttl(ttl: Duration) -> Result<(), ApiError> {
    if ttl < TTL_MIN || ttl > TTL_MAX {
        return Err(ApiError::invalid(format!(
            "TTL {} is outside the allowed range",
            format_duration(ttl)
        ))
        .hint("use a TTL between 10s and 7d, e.g. --ttl 2h"));
    }
    Ok(())
}

#[cfg(test)]
mod service_tests;
