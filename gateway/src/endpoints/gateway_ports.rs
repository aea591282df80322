//! The endpoint service's ports over the whole gateway, for the parts that are not services of
//! their own yet: the front ends (they take the `Gateway`), the grants (`grants::GatewayGrants`)
//! and the audit log (a plain value in `Gateway`).
//!
//! They hold the gateway weakly: the service is part of the gateway, so a strong handle would
//! keep it alive forever. The gateway outlives every request and task that reaches them (the
//! shutdown drains those first), so an upgrade only fails after shutdown, where it refuses.
// Until the front ends, grants and audit log are services the endpoint service can hold.

use super::{
    front_ends::FrontEnds, kube, postgres, ssh, tcp, FrontEndPort, Listening, LiveEndpoint,
};
use crate::{
    audit::{Subject, TrailDown},
    ports::{AuditSink, GrantGate},
    server::Gateway,
    store::{ApplianceRow, GrantRow},
};
use async_trait::async_trait;
use endpoint_types::{
    api::EndpointAccess,
    resource::{EndpointType, PolicySummary},
    ApiError,
};
use jiff::Timestamp;
use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Weak},
};

fn gone() -> ApiError {
    ApiError::internal("the gateway is shutting down")
}

/// The front ends: the kubectl, postgres and ssh endpoints share their type's listener; a tcp
/// endpoint gets one of its own on `host`.
pub struct GatewayFrontEnds {
    pub gateway: Weak<Gateway>,
    pub shared: FrontEnds,
    pub host: IpAddr,
}

impl FrontEndPort for GatewayFrontEnds {
    fn listen(
        &self,
        t: EndpointType,
        preferred: Option<SocketAddr>,
    ) -> Result<Listening, ApiError> {
        if let Some(addr) = self.shared.of(t) {
            return Ok(Listening {
                address: addr.to_string(),
                listener: None,
            });
        }
        let listener = tcp::bind(self.host, preferred)
            .map_err(|e| ApiError::internal(format!("cannot open a listener: {e}")))?;
        let address = listener
            .local_addr()
            .map_err(|e| ApiError::internal(e.to_string()))?
            .to_string();
        Ok(Listening {
            address,
            listener: Some(listener),
        })
    }

    fn serve(&self, ep: Arc<LiveEndpoint>, listener: std::net::TcpListener) {
        let Some(gw) = self.gateway.upgrade() else {
            return tracing::warn!(endpoint = %ep.id, "not serving the endpoint: the gateway is shutting down");
        };
        gw.tasks
            .spawn_on(tcp::serve(gw.clone(), ep, listener), &gw.data_plane);
    }

    fn access(&self, ep: &LiveEndpoint, address: Option<&str>) -> Result<EndpointAccess, ApiError> {
        let gw = self.gateway.upgrade().ok_or_else(gone)?;
        match ep.endpoint_type {
            EndpointType::Tcp => tcp::access(&gw, ep, address),
            EndpointType::Kubectl => kube::access(&gw, ep),
            EndpointType::Postgres => postgres::access(&gw, ep),
            EndpointType::Ssh => ssh::access(&gw, ep),
        }
    }
}

/// The gateway's audit log.
pub struct GatewayAudit(pub Weak<Gateway>);

#[async_trait]
impl AuditSink for GatewayAudit {
    async fn record(&self, kind: &str, actor: &str, subject: Subject, detail: serde_json::Value) {
        match self.0.upgrade() {
            Some(gw) => gw.audit.record(kind, actor, subject, detail).await,
            None => tracing::error!(kind, actor, "audit record lost: the gateway has shut down"),
        }
    }

    async fn record_before(
        &self,
        kind: &str,
        actor: &str,
        subject: Subject,
        detail: serde_json::Value,
    ) -> Result<(), TrailDown> {
        let gw = self
            .0
            .upgrade()
            .ok_or_else(|| TrailDown("the gateway has shut down".into()))?;
        gw.audit.record_before(kind, actor, subject, detail).await
    }
}

/// The grants, through [`crate::grants::GatewayGrants`].
pub struct GatewayGrantGate(pub Weak<Gateway>);

#[async_trait]
impl GrantGate for GatewayGrantGate {
    async fn require_operate(
        &self,
        appliance: &ApplianceRow,
        now: Timestamp,
    ) -> Result<GrantRow, ApiError> {
        let gw = self.0.upgrade().ok_or_else(gone)?;
        crate::grants::GatewayGrants(gw)
            .require_operate(appliance, now)
            .await
    }

    async fn automatic_decision(
        &self,
        appliance_id: &str,
        now: Timestamp,
    ) -> Option<(&'static str, Option<Timestamp>)> {
        let gw = self.0.upgrade()?;
        crate::grants::GatewayGrants(gw)
            .automatic_decision(appliance_id, now)
            .await
    }

    async fn policy_of(&self, appliance_id: &str) -> PolicySummary {
        match self.0.upgrade() {
            Some(gw) => {
                crate::grants::GatewayGrants(gw)
                    .policy_of(appliance_id)
                    .await
            }
            None => PolicySummary::default(),
        }
    }
}
