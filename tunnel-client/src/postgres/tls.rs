//! TLS from the agent to the database, as libpq's `sslmode` and `sslrootcert` in `admin_url`
//! ask: managed databases (RDS with `rds.force_ssl`, Cloud SQL, Azure) refuse anything else.
//!
//! | sslmode | TLS | server checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (libpq's default) | if the server offers it | no |
//! | `require` | always | no; with `sslrootcert`, as `verify-ca` (libpq does the same) |
//! | `verify-ca` | always | chain to `sslrootcert` |
//! | `verify-full` | always | chain to `sslrootcert` and the host's name |
//!
//! tokio-postgres knows only the first three modes and no `sslrootcert`, so both are taken out
//! of the connection string here before it is parsed.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls_pki_types::ServerName;
use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_rustls::{client::TlsStream, TlsConnector};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use prefer, require or verify-full".into(),
                )
            }
            other => {
                return Err(format!(
                    "unknown sslmode {other:?} (disable, prefer, require, verify-ca, verify-full)"
                ))
            }
        })
    }

    /// What tokio-postgres is told: it sends SSLRequest, the connector below checks.
    pub fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }
}

/// A connection string without its TLS options, and those options.
#[derive(Debug, PartialEq, Eq)]
pub struct TlsOptions {
    pub rest: String,
    pub sslmode: Option<String>,
    pub sslrootcert: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL (`postgres://…?sslmode=…`) or a key=value
/// string (`host=… sslmode=…`; quoted values are left to tokio-postgres, which then refuses
/// what it does not know).
pub fn split_tls_options(conn: &str) -> TlsOptions {
    let mut sslmode = None;
    let mut sslrootcert = None;
    let mut take = |k: &str, v: &str| match k {
        "sslmode" => {
            sslmode = Some(v.to_string());
            true
        }
        "sslrootcert" => {
            sslrootcert = Some(v.to_string());
            true
        }
        _ => false,
    };
    let rest = if conn.starts_with("postgres://") || conn.starts_with("postgresql://") {
        match conn.split_once('?') {
            None => conn.to_string(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        !take(k, &percent_decode(v))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        conn.split_whitespace()
            .filter(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                v.starts_with('\'') || !take(k.trim(), v)
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    TlsOptions {
        rest,
        sslmode,
        sslrootcert,
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How the agent reaches one resource's database over TLS.
#[derive(Clone)]
pub struct DbTls {
    pub mode: SslMode,
    /// `None` for `disable`.
    connector: Option<TlsConnector>,
}

impl std::fmt::Debug for DbTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl DbTls {
    /// From the options taken out of `admin_url`; the CA file is read now, so a bad one
    /// fails the config check rather than the first session.
    pub fn new(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Result<DbTls, String> {
        let mut mode = SslMode::parse(sslmode.unwrap_or("prefer"))?;
        let ca_pem = match sslrootcert {
            None | Some("") => None,
            Some("system") => {
                return Err("sslrootcert=system is not supported: name the CA file".into())
            }
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read sslrootcert {path}: {e}"))?,
            ),
        };
        if mode == SslMode::Require && ca_pem.is_some() {
            mode = SslMode::VerifyCa;
        }
        let check =
            match (mode, ca_pem.as_deref()) {
                (SslMode::Disable, _) => {
                    return Ok(DbTls {
                        mode,
                        connector: None,
                    })
                }
                (SslMode::Prefer | SslMode::Require, _) => certs::ServerCheck::EncryptOnly,
                (SslMode::VerifyCa, Some(ca_pem)) => certs::ServerCheck::Chain { ca_pem },
                (SslMode::VerifyFull, Some(ca_pem)) => certs::ServerCheck::ChainAndName { ca_pem },
                (SslMode::VerifyCa | SslMode::VerifyFull, None) => return Err(
                    "sslmode=verify-ca and verify-full need sslrootcert=<the database's CA file>"
                        .into(),
                ),
            };
        let config =
            certs::upstream_client_config(check).map_err(|e| format!("sslrootcert: {e}"))?;
        Ok(DbTls {
            mode,
            connector: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// Asks a fresh connection for TLS (SSLRequest) and makes the handshake when the server
    /// agrees; `prefer` goes on in plaintext when it does not.
    pub async fn negotiate(&self, mut tcp: TcpStream, host: &str) -> io::Result<Db> {
        let Some(connector) = &self.connector else {
            return Ok(Db::Tcp(tcp));
        };
        let mut request = BytesMut::with_capacity(8);
        frontend::ssl_request(&mut request);
        tcp.write_all(&request).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        match answer {
            [b'S'] => {
                let name = server_name(host)?;
                Ok(Db::Tls(Box::new(connector.connect(name, tcp).await?)))
            }
            [b'N'] if self.mode == SslMode::Prefer => Ok(Db::Tcp(tcp)),
            [b'N'] => Err(io::Error::other(format!(
                "the database does not offer TLS, and admin_url asks for sslmode={:?}",
                self.mode
            ))),
            _ => Err(io::Error::other(
                "the database answered SSLRequest with neither S nor N",
            )),
        }
    }

    /// For tokio-postgres (the admin connection).
    pub fn make_connect(&self) -> MakeRustls {
        MakeRustls {
            connector: self.connector.clone(),
        }
    }
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("host {host:?}: {e}")))
}

/// A session's connection to the database.
pub enum Db {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(tokio::net::UnixStream),
}

pub struct MakeRustls {
    connector: Option<TlsConnector>,
}

impl MakeTlsConnect<tokio_postgres::Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            connector: self.connector.clone(),
            name: server_name(domain)?,
        })
    }
}

pub struct RustlsConnect {
    connector: Option<TlsConnector>,
    name: ServerName<'static>,
}

impl TlsConnect<tokio_postgres::Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move {
            // Only reached when sslmode is not `disable` (tokio-postgres is told the same).
            let connector = self
                .connector
                .ok_or_else(|| io::Error::other("TLS is disabled for this database"))?;
            Ok(RustlsStream(Box::new(
                connector.connect(self.name, stream).await?,
            )))
        })
    }
}

pub struct RustlsStream(Box<TlsStream<tokio_postgres::Socket>>);

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM without channel binding: the binding's hash depends on the certificate's
        // signature algorithm, and a wrong one would fail the login outright.
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_options_come_out_of_urls_and_key_value_strings() {
        let o = split_tls_options("postgres://admin:pw@db.internal:5432/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x");
        assert_eq!(
            o.rest,
            "postgres://admin:pw@db.internal:5432/app?application_name=x"
        );
        assert_eq!(
            (o.sslmode.as_deref(), o.sslrootcert.as_deref()),
            (Some("verify-full"), Some("/etc/ca.pem"))
        );
        let o = split_tls_options("postgresql://db/app?sslmode=require");
        assert_eq!(
            (o.rest.as_str(), o.sslmode.as_deref(), o.sslrootcert),
            ("postgresql://db/app", Some("require"), None)
        );
        let o = split_tls_options("postgres://db/app");
        assert_eq!((o.rest.as_str(), o.sslmode), ("postgres://db/app", None));
        let o =
            split_tls_options("host=db port=5432 sslmode=verify-ca sslrootcert=/ca.pem user=admin");
        assert_eq!(o.rest, "host=db port=5432 user=admin");
        assert_eq!(
            (o.sslmode.as_deref(), o.sslrootcert.as_deref()),
            (Some("verify-ca"), Some("/ca.pem"))
        );
    }

    #[test]
    fn modes_and_their_requirements() {
        assert_eq!(
            DbTls::new(None, None).unwrap().mode,
            SslMode::Prefer,
            "libpq's default"
        );
        assert!(DbTls::new(Some("disable"), None)
            .unwrap()
            .connector
            .is_none());
        assert_eq!(
            DbTls::new(Some("require"), None).unwrap().mode,
            SslMode::Require
        );
        for m in ["verify-ca", "verify-full"] {
            let e = DbTls::new(Some(m), None).unwrap_err();
            assert!(e.contains("sslrootcert"), "{e}");
        }
        assert!(DbTls::new(Some("allow"), None)
            .unwrap_err()
            .contains("not supported"));
        assert!(DbTls::new(Some("bogus"), None)
            .unwrap_err()
            .contains("unknown sslmode"));
        assert!(DbTls::new(Some("verify-full"), Some("/nonexistent/ca.pem"))
            .unwrap_err()
            .contains("cannot read sslrootcert"));

        let dir = tempfile::tempdir().unwrap();
        let ca = certs::Ca::generate("db CA", jiff::Timestamp::now()).unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, ca.cert_pem()).unwrap();
        let path = path.to_str().unwrap();
        assert_eq!(
            DbTls::new(Some("require"), Some(path)).unwrap().mode,
            SslMode::VerifyCa,
            "as libpq does"
        );
        assert_eq!(
            DbTls::new(Some("verify-full"), Some(path)).unwrap().mode,
            SslMode::VerifyFull
        );
        std::fs::write(dir.path().join("bad.pem"), "not a certificate").unwrap();
        assert!(DbTls::new(
            Some("verify-full"),
            Some(dir.path().join("bad.pem").to_str().unwrap())
        )
        .is_err());
    }
}
