//! A webhook URL, checked when it is set: `https://` only, a host, no credentials, and a
//! literal IP address judged at once (names are judged after each resolution).

use super::address::{refused, AddressClass};
use endpoint_types::{ApiError, ErrorCode};
use std::net::IpAddr;

const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Name(String),
    Ip(IpAddr),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    /// The Host header: the host as written, with the port when it is not 443.
    pub authority: String,
    pub path_and_query: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("webhook URL {0:?} is not https://")]
    NotHttps(String),
    #[error("webhook URL {url:?} is not a valid URL: {why}")]
    Invalid { url: String, why: String },
    #[error("webhook URL {url:?} points at {ip}, a {} address", class.as_str())]
    Refused {
        url: String,
        ip: IpAddr,
        class: AddressClass,
    },
}

impl TargetError {
    pub fn to_api_error(&self) -> ApiError {
        let hint = match self {
            TargetError::NotHttps(_) => {
                "webhooks are delivered over https:// only; put a TLS-terminating proxy in \
                 front of a plain-http receiver and pass its CA with --receiver-ca-file"
                    .to_string()
            }
            TargetError::Invalid { .. } => {
                "give a URL like https://hooks.example.com/postern (no user:password@)".to_string()
            }
            TargetError::Refused { class, .. } if class.allowed_with_private() => {
                "a receiver inside your own network needs --allow-private (admin only)".to_string()
            }
            TargetError::Refused { .. } => {
                "this kind of address is never a webhook target; use the receiver's own address"
                    .to_string()
            }
        };
        let code = match self {
            TargetError::Refused { .. } => ErrorCode::Forbidden,
            _ => ErrorCode::InvalidRequest,
        };
        ApiError::new(code, self.to_string()).hint(hint)
    }
}

/// Parses and checks a webhook URL; a literal IP must pass [`refused`] with `allow_private`.
pub fn parse(url: &str, allow_private: bool) -> Result<Target, TargetError> {
    let invalid = |why: &str| TargetError::Invalid {
        url: url.to_string(),
        why: why.to_string(),
    };
    if url.len() > MAX_URL_LEN {
        return Err(invalid("longer than 2048 characters"));
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(_) => return Err(TargetError::NotHttps(url.to_string())),
        None => return Err(invalid("no scheme")),
    }
    let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("credentials in the URL"));
    }
    let raw_host = authority.host();
    if raw_host.is_empty() {
        return Err(invalid("no host"));
    }
    let bare = raw_host.trim_start_matches('[').trim_end_matches(']');
    let host = match bare.parse::<IpAddr>() {
        Ok(ip) => {
            if let Some(class) = refused(ip, allow_private) {
                return Err(TargetError::Refused {
                    url: url.to_string(),
                    ip,
                    class,
                });
            }
            Host::Ip(ip)
        }
        Err(_) => {
            let name = bare.trim_end_matches('.').to_ascii_lowercase();
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(invalid("the host is neither a DNS name nor an IP address"));
            }
            Host::Name(name)
        }
    };
    let port = uri.port_u16().unwrap_or(443);
    if port == 0 {
        return Err(invalid("port 0"));
    }
    Ok(Target {
        host,
        port,
        authority: authority.as_str().to_string(),
        path_and_query: uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_urls_parse() {
        let t = parse("https://Hooks.Example.com/postern?x=1", false).unwrap();
        assert_eq!(t.host, Host::Name("hooks.example.com".into()));
        assert_eq!(t.port, 443);
        assert_eq!(t.authority, "Hooks.Example.com");
        assert_eq!(t.path_and_query, "/postern?x=1");
        let t = parse("https://127.0.0.1:8443", true).unwrap();
        assert_eq!(t.host, Host::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!((t.port, t.path_and_query.as_str()), (8443, "/"));
        let t = parse("https://[::1]:9/h", true).unwrap();
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
    }

    #[test]
    fn plain_http_and_bad_urls_are_refused_with_a_hint() {
        let e = parse("http://hooks.example.com/x", false).unwrap_err();
        assert_eq!(
            e,
            TargetError::NotHttps("http://hooks.example.com/x".into())
        );
        let api = e.to_api_error();
        assert_eq!(api.code, ErrorCode::InvalidRequest);
        assert!(api.hint.contains("https://"));
        for bad in [
            "hooks.example.com/x",
            "https://",
            "https://user:pw@hooks.example.com/",
            "https://bad_host!/",
            "https://h.example:0/",
        ] {
            assert!(
                matches!(parse(bad, false), Err(TargetError::Invalid { .. })),
                "{bad}"
            );
        }
        assert!(parse(&format!("https://h.example/{}", "a".repeat(3000)), false).is_err());
    }

    #[test]
    fn literal_private_and_metadata_addresses_are_refused_at_once() {
        let e = parse("https://127.0.0.1:8443/", false).unwrap_err();
        assert!(matches!(
            e,
            TargetError::Refused {
                class: AddressClass::Loopback,
                ..
            }
        ));
        assert!(e.to_api_error().hint.contains("--allow-private"));
        for (url, allow) in [
            ("https://169.254.169.254/latest/meta-data", false),
            ("https://169.254.169.254/latest/meta-data", true),
            ("https://[fd00:ec2::254]/", true),
            ("https://[::ffff:10.0.0.1]/", false),
            ("https://0.0.0.0:443/", true),
        ] {
            assert!(
                matches!(parse(url, allow), Err(TargetError::Refused { .. })),
                "{url} allow_private={allow}"
            );
        }
        // A name is not resolved here: it is judged at each delivery.
        assert!(parse("https://localhost:8443/", false).is_ok());
    }
}
