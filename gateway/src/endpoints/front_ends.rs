//! The shared listeners of the kubectl, postgres and ssh endpoint types: one per type, chosen
//! among endpoints by the client's credential. Their ports are kept in the data dir, so
//! kubeconfigs, connection strings and ssh configs handed out before a restart keep working.

mod context;
#[cfg(test)]
pub mod fakes;
mod port;

pub use context::{AgentReach, FrontEndContext, FrontEndStore, SessionAudit};
pub use port::FrontEndListeners;

use serde::{Deserialize, Serialize};
use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
};

const FILE: &str = "front_ends.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontEnds {
    pub kube: SocketAddr,
    pub postgres: SocketAddr,
    pub ssh: SocketAddr,
}

/// The bound listeners, before they are served.
pub struct Bound {
    pub addrs: FrontEnds,
    pub kube: std::net::TcpListener,
    pub postgres: std::net::TcpListener,
    pub ssh: std::net::TcpListener,
}

/// Binds the three front ends on `host`, on the ports of the last run when they are free.
pub fn bind(host: IpAddr, data_dir: &Path) -> std::io::Result<Bound> {
    let path = data_dir.join(FILE);
    let previous: Option<FrontEnds> = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|p: &FrontEnds| p.kube.ip() == host);
    let kube = super::tcp::bind(host, previous.map(|p| p.kube))?;
    let postgres = super::tcp::bind(host, previous.map(|p| p.postgres))?;
    let ssh = super::tcp::bind(host, previous.map(|p| p.ssh))?;
    let addrs = FrontEnds {
        kube: kube.local_addr()?,
        postgres: postgres.local_addr()?,
        ssh: ssh.local_addr()?,
    };
    if previous != Some(addrs) {
        let json = serde_json::to_vec_pretty(&addrs).map_err(std::io::Error::other)?;
        std::fs::write(&path, json)?;
    }
    Ok(Bound {
        addrs,
        kube,
        postgres,
        ssh,
    })
}

impl FrontEnds {
    pub fn of(&self, t: endpoint_types::resource::EndpointType) -> Option<SocketAddr> {
        use endpoint_types::resource::EndpointType;
        match t {
            EndpointType::Kubectl => Some(self.kube),
            EndpointType::Postgres => Some(self.postgres),
            EndpointType::Ssh => Some(self.ssh),
            EndpointType::Tcp => None,
        }
    }
}
