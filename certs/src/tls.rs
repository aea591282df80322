use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::fingerprint::{fingerprint, normalize};
use crate::{provider, CertError, Secret};

// QUIC requires TLS 1.3 and every Postern client speaks it, so older versions are never offered.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// Whether a server asks for, and how it treats, client certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

/// rustls server config (TLS 1.3, ring). `chain_pem` is the leaf followed by intermediates/CA.
/// With `Optional`/`Required`, client certificates are verified against `client_ca_pem`.
pub fn server_config(
    chain_pem: &str,
    key_pem: &Secret,
    client_ca_pem: Option<&str>,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, CertError> {
    let mut config = server_builder(client_ca_pem, client_auth)?
        .with_single_cert(certs(chain_pem)?, private_key(key_pem)?)?;
    config.alpn_protocols = alpn;
    Ok(config)
}

/// [`server_config`] whose certificate `resolver` picks at each handshake (one the vendor
/// supplies and replaces on disk, `crate::served_cert`).
pub fn server_config_with_resolver(
    resolver: Arc<dyn rustls::server::ResolvesServerCert>,
    client_ca_pem: Option<&str>,
    client_auth: ClientAuth,
    alpn: Vec<Vec<u8>>,
) -> Result<ServerConfig, CertError> {
    let mut config = server_builder(client_ca_pem, client_auth)?.with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    Ok(config)
}

fn server_builder(
    client_ca_pem: Option<&str>,
    client_auth: ClientAuth,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::server::WantsServerCert>, CertError> {
    let builder =
        ServerConfig::builder_with_provider(provider()).with_protocol_versions(VERSIONS)?;
    let builder = match (client_auth, client_ca_pem) {
        (ClientAuth::None, _) => builder.with_no_client_auth(),
        (_, None) => {
            return Err(CertError::Verifier(
                "client authentication requested without a client CA".into(),
            ))
        }
        (mode, Some(ca_pem)) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider());
            let verifier = if mode == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| CertError::Verifier(e.to_string()))?,
            )
        }
    };
    Ok(builder)
}

/// rustls client config trusting exactly `ca_pem` (TLS 1.3, ring), optionally presenting a
/// client certificate `(chain_pem, key_pem)`.
pub fn client_config(
    ca_pem: &str,
    client: Option<(&str, &Secret)>,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, CertError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots(ca_pem)?);
    let mut config = match client {
        Some((cert_pem, key_pem)) => {
            builder.with_client_auth_cert(certs(cert_pem)?, private_key(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Client config (TLS 1.3, no client certificate) trusting `roots`, e.g. the host's
/// ([`crate::system_roots`]).
pub fn client_config_with_roots(
    roots: RootCertStore,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, CertError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Client config for enrollment, before the agent has the CA certificate: the server's chain
/// must contain a certificate with fingerprint `ca_fingerprint` ("sha256:<hex>"), and the leaf
/// must verify against that certificate as the only trust anchor.
pub fn pinned_client_config(
    ca_fingerprint: &str,
    alpn: Vec<Vec<u8>>,
) -> Result<ClientConfig, CertError> {
    let verifier = SignedWith::verifier(
        PinnedCa {
            pin: normalize(ca_fingerprint)?,
            provider: provider(),
        },
        provider(),
    );
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn;
    Ok(config)
}

/// The certificate half of a custom server verifier; [`SignedWith`] adds the other half, the
/// handshake signatures, which every Postern verifier checks the same way (the provider's
/// algorithms against the presented certificate).
trait ServerCertCheck: std::fmt::Debug + Send + Sync {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error>;
}

/// A [`ServerCertCheck`] made a rustls verifier, its handshake signatures checked with
/// `provider`'s algorithms.
#[derive(Debug)]
struct SignedWith<C> {
    check: C,
    provider: Arc<CryptoProvider>,
}

impl<C: ServerCertCheck> SignedWith<C> {
    fn verifier(check: C, provider: Arc<CryptoProvider>) -> Arc<Self> {
        Arc::new(SignedWith { check, provider })
    }
}

impl<C: ServerCertCheck> ServerCertVerifier for SignedWith<C> {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check
            .check(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Trusts whichever presented certificate matches the pin, then defers all real checking
/// (signatures, validity, name, EKU) to webpki with that certificate as the sole root.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertCheck for PinnedCa {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain = || std::iter::once(end_entity).chain(intermediates);
        let Some(anchor) = chain().find(|c| fingerprint(c) == self.pin) else {
            let presented: Vec<_> = chain().map(|c| fingerprint(c)).collect();
            let err = CertError::Fingerprint(format!(
                "server presented no certificate with the pinned CA fingerprint {}; presented: {}",
                self.pin,
                presented.join(", ")
            ));
            return Err(CertificateError::Other(OtherError(Arc::new(err))).into());
        };
        let mut roots = RootCertStore::empty();
        roots.add(anchor.clone().into_owned())?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }
}

/// How a client checks a server outside Postern (an appliance's database), in libpq's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerCheck<'a> {
    /// `sslmode=require` without a CA: encrypted, the server unauthenticated (its handshake
    /// signature is still checked against the certificate it presents).
    EncryptOnly,
    /// `verify-ca`: the chain must lead to `ca_pem`; any name.
    Chain { ca_pem: &'a str },
    /// `verify-full`: the chain must lead to `ca_pem` and name the host dialled.
    ChainAndName { ca_pem: &'a str },
}

/// rustls client config for a server that is not Postern's (TLS 1.2 or 1.3, ring): databases
/// still commonly stop at 1.2.
pub fn upstream_client_config(check: ServerCheck<'_>) -> Result<ClientConfig, CertError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match check {
        ServerCheck::ChainAndName { ca_pem } => builder.with_root_certificates(roots(ca_pem)?),
        ServerCheck::Chain { ca_pem } => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(ca_pem)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| CertError::Tls(rustls::Error::General(e.to_string())))?;
            let verifier = SignedWith::verifier(AnyName { inner }, provider);
            builder
                .dangerous()
                .with_custom_certificate_verifier(verifier)
        }
        ServerCheck::EncryptOnly => builder
            .dangerous()
            .with_custom_certificate_verifier(SignedWith::verifier(AnyServer, provider)),
    };
    Ok(config.with_no_client_auth())
}

/// `verify-ca`: webpki's checks, except that the certificate need not name the host.
#[derive(Debug)]
struct AnyName {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertCheck for AnyName {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the name last, after the chain, validity and usage have passed.
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
}

/// `require` without a CA: any certificate, but the handshake must be signed by its key
/// ([`SignedWith`] checks that).
#[derive(Debug)]
struct AnyServer;

impl ServerCertCheck for AnyServer {
    fn check(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
}

pub(crate) fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::Pem("no certificate found".into()));
    }
    Ok(certs)
}

fn roots(ca_pem: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

pub(crate) fn private_key(key_pem: &Secret) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(key_pem.expose().as_bytes())
        .map_err(|e| CertError::Pem(format!("private key: {e}")))
}
