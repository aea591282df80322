//! The endpoint service's port over the whole gateway, for the part that is not a service of
//! its own yet: the front ends (they take the `Gateway`).
//!
//! They hold the gateway weakly: the service is part of the gateway, so a strong handle would
//! keep it alive forever. The gateway outlives every request and task that reaches them (the
//! shutdown drains those first), so an upgrade only fails after shutdown, where it refuses.
// Until the front ends are a service the endpoint service can hold.

use super::{
    front_ends::FrontEnds, kube, postgres, ssh, tcp, FrontEndPort, Listening, LiveEndpoint,
};
use crate::server::Gateway;
use endpoint_types::{api::EndpointAccess, resource::EndpointType, ApiError};
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
