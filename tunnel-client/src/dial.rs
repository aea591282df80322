//! Outbound QUIC to the gateway, without ever holding a listening socket.
//!
//! An unconnected UDP socket accepts datagrams from anyone and shows up in `ss -lu`; the
//! appliance must expose nothing. So each attempt binds an ephemeral port and `connect()`s it
//! to the one gateway address, and the endpoint has no server config.

use quinn::{ClientConfig, Connection, Endpoint, EndpointConfig, TransportConfig};
use std::{
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{addr:?} is not HOST:PORT")]
    NotHostPort { addr: String },
    #[error("cannot resolve {addr}: {reason}")]
    Resolve { addr: String, reason: String },
    #[error("cannot open a UDP socket toward {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration for QUIC is unusable: {0}")]
    Tls(String),
    #[error("cannot connect to the gateway at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the gateway at {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
}

impl DialError {
    /// The server presented a certificate the pinned or trusted CA does not vouch for.
    pub fn is_certificate_rejection(&self) -> bool {
        matches!(self, DialError::Connect { reason, .. } if reason.contains("certificate"))
    }
}

/// Splits `host:port` (`[v6]:port` for IPv6 literals); the host is what TLS verifies.
pub fn split_host_port(addr: &str) -> Result<(&str, u16), DialError> {
    let bad = || DialError::NotHostPort {
        addr: addr.to_string(),
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = match host.strip_prefix('[') {
        Some(h) => h.strip_suffix(']').ok_or_else(bad)?,
        None if host.contains(':') => return Err(bad()),
        None => host,
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

/// The transport both enrollment and the tunnel use. Windows are generous because one
/// connection carries every proxied session; keep-alive stays below the idle timeout so a
/// quiet but healthy tunnel is never dropped.
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    // 15 s fits in a VarInt, so the conversion cannot fail; None would mean "never idle out".
    t.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(15)).ok());
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1024));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t
}

pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<ClientConfig, DialError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| DialError::Tls(e.to_string()))?;
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Resolves `gateway` and connects to the first address that answers within `timeout`.
/// Returns the endpoint too: the caller must keep it to close gracefully (`wait_idle`).
///
/// ICMP errors never reach quinn (it drops socket errors on receive), so a gateway that is
/// down looks like one that is slow; the timeout is what bounds an attempt.
pub async fn connect(
    gateway: &str,
    config: &ClientConfig,
    timeout: Duration,
) -> Result<(Endpoint, Connection), DialError> {
    tokio::time::timeout(timeout, connect_any(gateway, config))
        .await
        .map_err(|_| DialError::Timeout {
            addr: gateway.to_string(),
            after: timeout,
        })?
}

async fn connect_any(
    gateway: &str,
    config: &ClientConfig,
) -> Result<(Endpoint, Connection), DialError> {
    let (host, port) = split_host_port(gateway)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| DialError::Resolve {
            addr: gateway.to_string(),
            reason: e.to_string(),
        })?
        .collect();
    let mut last = DialError::Resolve {
        addr: gateway.to_string(),
        reason: "no addresses".into(),
    };
    for addr in addrs {
        match connect_addr(addr, host, config).await {
            Ok(pair) => return Ok(pair),
            Err(e) => {
                tracing::debug!(%addr, error = %e, "gateway address did not answer");
                last = e;
            }
        }
    }
    Err(last)
}

async fn connect_addr(
    addr: SocketAddr,
    server_name: &str,
    config: &ClientConfig,
) -> Result<(Endpoint, Connection), DialError> {
    let endpoint = connected_endpoint(addr, config.clone())?;
    let failed = |reason: String| DialError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let connecting = endpoint
        .connect(addr, server_name)
        .map_err(|e| failed(e.to_string()))?;
    let conn = connecting.await.map_err(|e| failed(e.to_string()))?;
    Ok((endpoint, conn))
}

fn connected_endpoint(addr: SocketAddr, config: ClientConfig) -> Result<Endpoint, DialError> {
    let sock_err = |source| DialError::Socket { addr, source };
    let socket = connected_socket(addr).map_err(sock_err)?;
    let mut endpoint = Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(sock_err)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

fn connected_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let bind = if addr.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            split_host_port("relay.example.com:4433").unwrap(),
            ("relay.example.com", 4433)
        );
        assert_eq!(split_host_port("127.0.0.1:1").unwrap(), ("127.0.0.1", 1));
        assert_eq!(split_host_port("[::1]:4433").unwrap(), ("::1", 4433));
        for bad in [
            "",
            "host",
            ":4433",
            "host:",
            "host:0",
            "host:99999",
            "::1:4433",
            "[::1:4433",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn silence_is_a_timeout() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tls =
            certs::pinned_client_config(&format!("sha256:{}", "a".repeat(64)), vec![b"x".to_vec()])
                .unwrap();
        let config = quic_client_config(tls).unwrap();
        let addr = peer.local_addr().unwrap().to_string();
        let e = connect(&addr, &config, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, DialError::Timeout { .. }), "{e}");
    }

    #[test]
    fn the_socket_is_connected_not_listening() {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let socket = connected_socket(peer.local_addr().unwrap()).unwrap();
        // A connected UDP socket has a peer: the kernel drops datagrams from anyone else and
        // `ss -lu` does not list it.
        assert_eq!(socket.peer_addr().unwrap(), peer.local_addr().unwrap());
    }
}
