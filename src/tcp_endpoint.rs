//! tcp endpoints as an operator reaches them: the real `postern ops endpoint connect`
//! forwarder process, and an in-process TLS client presenting an endpoint's client certificate
//! (for attacks the forwarder would never make, such as one endpoint's certificate against
//! another endpoint's listener).

use crate::testbed::{append_log, bin, first_line, terminate, Gateway};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

/// `postern ops endpoint create --type tcp` for `resource` of `app` at `customer`, TTL 10 m, as
/// the admin on the operator's machine whose home is `home` (the endpoint's key stays there);
/// the endpoint record.
pub fn create(
    gw: &Gateway,
    home: &Path,
    app: &str,
    customer: &str,
    resource: &str,
) -> Result<Value> {
    gw.create_endpoint(home, "tcp", app, customer, resource, "10m")?
        .ok()
}

/// A running `postern ops endpoint connect` forwarder.
pub struct Forwarder {
    child: Child,
    /// The local address it accepts plain TCP on.
    pub listen: SocketAddr,
    pub endpoint_id: String,
    /// Its stderr (per-connection outcomes).
    pub log: PathBuf,
}

impl Forwarder {
    /// `postern --output json ops endpoint connect ID` as `token` on the operator's machine whose
    /// home is `home` (where `create` left the endpoint's key). Returns once it reports its port.
    pub fn start(gw: &Gateway, token: &str, home: &Path, endpoint_id: &str) -> Result<Forwarder> {
        let log = home.join(format!("forwarder-{endpoint_id}.log"));
        let mut child = Command::new(bin("postern")?)
            .args([
                "--output",
                "json",
                "ops",
                "endpoint",
                "connect",
                endpoint_id,
            ])
            .env("POSTERN_ADDR", gw.api.to_string())
            .env("POSTERN_TOKEN", token)
            .env("POSTERN_CA_FILE", &gw.ca_file)
            .env("HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(append_log(&log)?)
            .spawn()
            .context("starting postern ops endpoint connect")?;
        let line = first_line(&mut child, Duration::from_secs(30))?;
        let v: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(_) => {
                terminate(&mut child, Duration::from_secs(2));
                bail!(
                    "the forwarder did not report its port: {line:?}; log: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        let Some(listen) = v["listen"].as_str() else {
            terminate(&mut child, Duration::from_secs(2));
            bail!(
                "the forwarder failed: {v}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        if v["endpoint_id"] != endpoint_id {
            bail!("the forwarder reports another endpoint: {v}");
        }
        Ok(Forwarder {
            listen: listen.parse()?,
            child,
            endpoint_id: endpoint_id.to_string(),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM; returns its exit status if it exited by itself within the grace time.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        terminate(&mut self.child, Duration::from_secs(5))
    }

    /// Whether it has exited (by itself: it stops once its endpoint has expired).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(5));
    }
}

/// An endpoint's credential file (`tcp_credential` of `create`/`get`) as a TLS client.
pub struct TcpCredential {
    pub endpoint_id: String,
    pub address: SocketAddr,
    server_name: rustls::pki_types::ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

impl TcpCredential {
    pub fn load(path: &Path) -> Result<TcpCredential> {
        let v: Value = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("{} lacks {k}", path.display()))
        };
        let key = certs::Secret::new(field("key_pem")?);
        let config = certs::client_config(
            &field("ca_pem")?,
            Some((&field("cert_pem")?, &key)),
            Vec::new(),
        )?;
        Ok(TcpCredential {
            endpoint_id: field("endpoint_id")?,
            address: field("address")?.parse()?,
            server_name: rustls::pki_types::ServerName::try_from(field("tls_server_name")?)?,
            config: Arc::new(config),
        })
    }

    /// The credential file named by an endpoint record printed by `create`/`get`.
    pub fn of_record(ep: &Value) -> Result<TcpCredential> {
        let path = ep["tcp_credential"]
            .as_str()
            .ok_or_else(|| anyhow!("no tcp_credential in {ep}"))?;
        Self::load(Path::new(path))
    }

    /// A blocking TLS connection to `addr` presenting this credential.
    pub fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        tcp.set_nodelay(true)?;
        tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
        let conn = rustls::ClientConnection::new(self.config.clone(), self.server_name.clone())?;
        Ok(rustls::StreamOwned::new(conn, tcp))
    }

    /// An async TLS connection to `addr` presenting this credential (benchmarks).
    pub async fn connect_async(
        &self,
        addr: SocketAddr,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await?)
    }

    /// Sends `data` (small) to `addr` over TLS, closes the sending side, and returns what came
    /// back before the server closed; an error when the connection broke instead.
    pub fn round_trip(&self, addr: SocketAddr, data: &[u8]) -> Result<Vec<u8>> {
        let mut s = self.connect(addr)?;
        s.write_all(data)?;
        s.conn.send_close_notify();
        s.flush()?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    }
}
