//! `postern server --config FILE`: the gateway's own settings.

use endpoint_types::duration::HumanDuration;
use serde::Deserialize;
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub data_dir: PathBuf,
    pub api: SocketAddr,
    pub relay: SocketAddr,
    /// `sqlite:PATH`; None = `postern.db` in the data dir.
    pub store: Option<String>,
    /// Extra DNS names / IPs for the server certificate.
    pub server_names: Vec<String>,
    pub endpoint_host: IpAddr,
    pub limits: Limits,
    /// A server certificate chain and key the vendor supplies (e.g. from a public CA), served
    /// by the API instead of one the gateway CA issues, reloaded on change (crate::tls_reload).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served (crate::metrics); None = nowhere.
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub sessions_per_endpoint: u64,
    pub handshake_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub agent_lost_after: Duration,
    pub default_endpoint_ttl: Duration,
    /// Threads of the data-plane runtime (relay and sessions); 1 = a current-thread runtime,
    /// which measured fastest for one busy agent on a small machine.
    pub data_plane_threads: usize,
    /// Unauthenticated handshakes each listener holds at once, in total and per source
    /// (`crate::admission`).
    pub unauthenticated: crate::admission::AdmissionLimits,
    /// Refused enrollments and certificate-less tunnel attempts: one `denied` record per
    /// source and window, and at most this many sources per window (`crate::denied_aggregate`).
    pub denied_window: Duration,
    pub denied_max_sources: usize,
    /// Lifetime of the agent certificates the gateway signs (enrollment and renewal); agents
    /// renew two thirds into it (crate::cert_renewal).
    pub agent_cert_lifetime: Duration,
    /// How often, at most, one agent connection is sent the vendor trail's latest signed head
    /// (`crate::head_pacing`).
    pub trail_head_interval: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            sessions_per_endpoint: 64,
            handshake_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(5),
            agent_lost_after: Duration::from_secs(15),
            default_endpoint_ttl: Duration::from_secs(3600),
            data_plane_threads: 1,
            unauthenticated: crate::admission::AdmissionLimits::default(),
            denied_window: Duration::from_secs(60),
            denied_max_sources: 1024,
            agent_cert_lifetime: crate::cert_renewal::DEFAULT_LIFETIME,
            trail_head_interval: endpoint_types::trail_head::HEAD_EVERY,
        }
    }
}

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

impl GatewayConfig {
    pub fn new(data_dir: PathBuf) -> GatewayConfig {
        GatewayConfig {
            data_dir,
            api: SocketAddr::new(LOCALHOST, 0),
            relay: SocketAddr::new(LOCALHOST, 0),
            store: None,
            server_names: Vec::new(),
            endpoint_host: LOCALHOST,
            limits: Limits::default(),
            tls_cert: None,
            tls_key: None,
            metrics: None,
        }
    }
}

/// The TOML file form.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: PathBuf,
    api: Option<SocketAddr>,
    relay: Option<SocketAddr>,
    store: Option<String>,
    #[serde(default)]
    server_names: Vec<String>,
    endpoint_host: Option<IpAddr>,
    #[serde(default)]
    limits: FileLimits,
    /// `agent_cert_lifetime = "90d"`: see [`Limits::agent_cert_lifetime`].
    agent_cert_lifetime: Option<HumanDuration>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    metrics: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    sessions_per_endpoint: Option<u64>,
    handshake_timeout: Option<HumanDuration>,
    heartbeat_interval: Option<HumanDuration>,
    agent_lost_after: Option<HumanDuration>,
    default_endpoint_ttl: Option<HumanDuration>,
    data_plane_threads: Option<usize>,
    unauthenticated_max: Option<usize>,
    unauthenticated_max_per_source: Option<usize>,
    denied_window: Option<HumanDuration>,
    denied_max_sources: Option<usize>,
    trail_head_interval: Option<HumanDuration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
}

pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<GatewayConfig, ConfigError> {
    let f: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut cfg = GatewayConfig::new(base.join(f.data_dir));
    if let Some(a) = f.api {
        cfg.api = a;
    }
    if let Some(r) = f.relay {
        cfg.relay = r;
    }
    cfg.store = f.store;
    cfg.server_names = f.server_names;
    cfg.metrics = f.metrics;
    if let Some(h) = f.endpoint_host {
        cfg.endpoint_host = h;
    }
    if f.tls_cert.is_some() != f.tls_key.is_some() {
        return Err(ConfigError::Parse {
            path: path.to_path_buf(),
            message: "tls_cert and tls_key go together: give both or neither".into(),
        });
    }
    cfg.tls_cert = f.tls_cert.map(|p| base.join(p));
    cfg.tls_key = f.tls_key.map(|p| base.join(p));
    if let Some(d) = f.agent_cert_lifetime {
        cfg.limits.agent_cert_lifetime =
            crate::cert_renewal::check_lifetime(d.0).map_err(|message| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("agent_cert_lifetime: {message}"),
            })?;
    }
    let l = &mut cfg.limits;
    if let Some(n) = f.limits.sessions_per_endpoint {
        l.sessions_per_endpoint = n;
    }
    if let Some(n) = f.limits.data_plane_threads {
        l.data_plane_threads = n.max(1);
    }
    if let Some(n) = f.limits.unauthenticated_max {
        l.unauthenticated.total = n.max(1);
    }
    if let Some(n) = f.limits.unauthenticated_max_per_source {
        l.unauthenticated.per_source = n.max(1);
    }
    if let Some(n) = f.limits.denied_max_sources {
        l.denied_max_sources = n.max(1);
    }
    for (src, dst) in [
        (f.limits.denied_window, &mut l.denied_window),
        (f.limits.handshake_timeout, &mut l.handshake_timeout),
        (f.limits.heartbeat_interval, &mut l.heartbeat_interval),
        (f.limits.agent_lost_after, &mut l.agent_lost_after),
        (f.limits.default_endpoint_ttl, &mut l.default_endpoint_ttl),
        (f.limits.trail_head_interval, &mut l.trail_head_interval),
    ] {
        if let Some(d) = src {
            *dst = d.0;
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let cfg = parse(
            "data_dir = \"d\"\napi = \"127.0.0.1:8443\"\n[limits]\nagent_lost_after = \"20s\"\ntrail_head_interval = \"5m\"\n",
            Path::new("/etc/postern/gateway.toml"),
        )
        .unwrap();
        assert_eq!(cfg.data_dir, PathBuf::from("/etc/postern/d"));
        assert_eq!(cfg.api.port(), 8443);
        assert_eq!(cfg.limits.agent_lost_after, Duration::from_secs(20));
        assert_eq!(cfg.limits.trail_head_interval, Duration::from_secs(300));
        assert_eq!(
            Limits::default().trail_head_interval,
            endpoint_types::trail_head::HEAD_EVERY
        );

        assert_eq!(
            cfg.limits.agent_cert_lifetime,
            crate::cert_renewal::DEFAULT_LIFETIME
        );
        let short = parse(
            "data_dir = \"d\"\nagent_cert_lifetime = \"9s\"\n",
            Path::new("g.toml"),
        )
        .unwrap();
        assert_eq!(short.limits.agent_cert_lifetime, Duration::from_secs(9));
        let err = parse(
            "data_dir = \"d\"\nagent_cert_lifetime = \"1s\"\n",
            Path::new("g.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("agent_cert_lifetime"), "{err}");

        let err = parse("data_dir = \"d\"\nbogus = 1\n", Path::new("g.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus") && err.contains("line 2"), "{err}");
    }

    #[test]
    fn front_door_limits_have_defaults_and_can_be_set() {
        let cfg = parse("data_dir = \"d\"\n", Path::new("g.toml")).unwrap();
        assert_eq!(cfg.limits.unauthenticated.total, 1024);
        assert_eq!(cfg.limits.unauthenticated.per_source, 64);
        assert_eq!(cfg.limits.denied_window, Duration::from_secs(60));
        assert_eq!(cfg.limits.denied_max_sources, 1024);
        let cfg = parse(
            "data_dir = \"d\"\n[limits]\nunauthenticated_max = 10\nunauthenticated_max_per_source = 0\n\
             denied_window = \"2s\"\ndenied_max_sources = 5\n",
            Path::new("g.toml"),
        )
        .unwrap();
        assert_eq!(cfg.limits.unauthenticated.total, 10);
        assert_eq!(
            cfg.limits.unauthenticated.per_source, 1,
            "0 would refuse everyone"
        );
        assert_eq!(cfg.limits.denied_window, Duration::from_secs(2));
        assert_eq!(cfg.limits.denied_max_sources, 5);
    }
}
