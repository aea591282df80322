//! The CLI's HTTPS client for the gateway API (hyper over tokio-rustls, one request per call).

use bytes::Bytes;
use endpoint_types::{ApiError, ErrorCode, ErrorEnvelope};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use std::{path::PathBuf, sync::Arc, time::Duration};
use tokio_rustls::TlsConnector;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ApiClient {
    addr: String,
    token: Option<String>,
    tls: Arc<rustls::ClientConfig>,
    /// The gateway CA this client trusts, also the root of appliance certificates.
    ca_pem: String,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

const NO_CA_HINT: &str = "set POSTERN_CA_FILE (or --ca-file, or pick a --profile) to the `ca_file` printed by `postern server` or `postern dev`; without one the gateway must serve a certificate from a public CA (`tls_cert`)";

fn setup_error(message: String, hint: &str) -> ApiError {
    ApiError::invalid(message).hint(hint.to_string())
}

impl ApiClient {
    pub fn new(
        addr: Option<String>,
        token: Option<String>,
        ca_file: Option<PathBuf>,
    ) -> Result<ApiClient, ApiError> {
        let addr = addr.ok_or_else(|| {
            setup_error(
                "no gateway address".into(),
                "set POSTERN_ADDR (or --addr, or pick a --profile) to the `api` address printed by `postern server` or `postern dev`",
            )
        })?;
        let (tls, ca_pem) = match ca_file {
            Some(ca_file) => {
                let ca_pem = std::fs::read_to_string(&ca_file).map_err(|e| {
                    setup_error(
                        format!("cannot read CA file {}: {e}", ca_file.display()),
                        "check POSTERN_CA_FILE",
                    )
                })?;
                let tls = certs::client_config(&ca_pem, None, vec![b"http/1.1".to_vec()]).map_err(
                    |e| {
                        setup_error(
                            format!("CA file {} is not usable: {e}", ca_file.display()),
                            "check POSTERN_CA_FILE",
                        )
                    },
                )?;
                (tls, ca_pem)
            }
            // No CA file: the gateway serves a certificate from a public CA (`tls_cert`),
            // verified against the host's roots.
            None => {
                let (roots, _) = certs::system_roots().ok_or_else(|| {
                    setup_error(
                        "no CA file to verify the gateway with, and this host has no CA bundle"
                            .into(),
                        NO_CA_HINT,
                    )
                })?;
                let tls = certs::client_config_with_roots(roots, vec![b"http/1.1".to_vec()])
                    .map_err(|e| setup_error(format!("the host's CA bundle: {e}"), NO_CA_HINT))?;
                (tls, String::new())
            }
        };
        Ok(ApiClient {
            addr,
            token: token.map(|t| t.trim().to_string()),
            tls: Arc::new(tls),
            ca_pem,
        })
    }

    /// The gateway CA certificate (PEM) this client verifies the gateway with.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            ErrorCode::GatewayUnreachable,
            format!("cannot reach the gateway at {}: {why}", self.addr),
        )
        .hint("is `postern server` running, and is POSTERN_ADDR its `api` address?")
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.call_inner(method, path, body))
            .await
            .map_err(|_| self.unreachable("the request timed out"))?
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, ApiError> {
        let host = self
            .addr
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.addr);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string()).map_err(|_| {
            setup_error(
                format!("{host:?} is not a valid host name"),
                "check POSTERN_ADDR",
            )
        })?;
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| self.unreachable(e))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                let err = self.unreachable(format!("TLS: {e}"));
                if self.ca_pem.is_empty() {
                    // Verified against the host's roots: the likely fix is the gateway's CA.
                    err.hint(NO_CA_HINT)
                } else {
                    err
                }
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(conn);
        let payload = match &body {
            Some(v) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            None => Bytes::new(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.addr);
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e))?
            .to_bytes();
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| {
                ApiError::internal(format!(
                    "the gateway sent an answer this CLI does not understand: {e}"
                ))
            });
        }
        match serde_json::from_slice::<ErrorEnvelope>(&bytes) {
            Ok(env) => Err(env.error),
            Err(_) => Err(ApiError::internal(format!(
                "the gateway answered HTTP {status}"
            ))),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<T, ApiError> {
        self.call(Method::POST, path, Some(body)).await
    }
}
