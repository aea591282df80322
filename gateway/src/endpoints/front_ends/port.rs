//! The endpoint service's port onto the front ends: where an endpoint of a type listens, a
//! tcp endpoint's own listener served on the data plane, and what an endpoint's creator needs
//! to connect.

use super::FrontEndContext;
use crate::endpoints::{kube, postgres, ssh, tcp, FrontEndPort, Listening, LiveEndpoint};
use endpoint_types::{api::EndpointAccess, resource::EndpointType, ApiError};
use std::{net::SocketAddr, sync::Arc};

/// The kubectl, postgres and ssh endpoints share their type's listener; a tcp endpoint gets
/// one of its own on the endpoint host, served on `runtime`.
#[derive(Debug)]
pub struct FrontEndListeners {
    pub context: Arc<FrontEndContext>,
    /// The data plane, where the sessions run.
    pub runtime: tokio::runtime::Handle,
}

impl FrontEndPort for FrontEndListeners {
    fn listen(
        &self,
        t: EndpointType,
        preferred: Option<SocketAddr>,
    ) -> Result<Listening, ApiError> {
        if let Some(addr) = self.context.addrs.of(t) {
            return Ok(Listening {
                address: addr.to_string(),
                listener: None,
            });
        }
        let listener = tcp::bind(self.context.endpoint_host, preferred)
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
        self.context.tasks.spawn_on(
            tcp::serve(self.context.clone(), ep, listener),
            &self.runtime,
        );
    }

    fn access(&self, ep: &LiveEndpoint, address: Option<&str>) -> Result<EndpointAccess, ApiError> {
        let ctx = &self.context;
        match ep.endpoint_type {
            EndpointType::Tcp => tcp::access(ctx, ep, address),
            EndpointType::Kubectl => kube::access(ctx, ep),
            EndpointType::Postgres => postgres::access(ctx, ep),
            EndpointType::Ssh => ssh::access(ctx, ep),
        }
    }
}
