//! The kubectl client's files for an endpoint: a P-256 key made here (only its CSR leaves the
//! machine) and, once the endpoint is active, a self-contained kubeconfig — gateway address,
//! gateway CA, the signed client certificate and the key, the endpoint's namespace — that
//! stock kubectl reads with no exec plugin.

use base64::Engine;
use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord},
    secret::Secret,
    ApiError,
};
use std::path::{Path, PathBuf};

pub fn prepare() -> Result<(ClientCredential, Secret), ApiError> {
    let (key, csr_pem) = certs::generate_key_and_csr("postern kubectl endpoint")
        .map_err(|e| ApiError::internal(format!("cannot make a key: {e}")))?;
    Ok((ClientCredential::Kubectl { csr_pem }, key))
}

/// `aws_eks_cluster.main_cluster` → `main-cluster`: the resource's own name, file-name safe.
pub fn short_name(resource_id: &str) -> String {
    let name = resource_id.rsplit('.').next().unwrap_or(resource_id);
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_string();
    if s.is_empty() {
        "cluster".into()
    } else {
        s
    }
}

fn safe(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with('.')
}

pub fn kubeconfig_path(
    home: &Path,
    rec: &EndpointRecord,
    domain: &str,
) -> Result<PathBuf, ApiError> {
    let file = format!(
        "kubectl-ops-{}-{}.{domain}.yaml",
        short_name(&rec.origin_resource_id),
        rec.id
    );
    if !safe(&file) {
        return Err(ApiError::internal(format!(
            "unexpected kubeconfig name {file:?}"
        )));
    }
    Ok(home.join(".kube").join(file))
}

/// The kubeconfig text. YAML strings are JSON-quoted (JSON is a subset of YAML), so no value
/// can break the document's structure.
pub fn render(access: &EndpointAccess, key: &Secret) -> Result<String, ApiError> {
    let EndpointAccess::Kubectl {
        server,
        tls_server_name,
        ca_pem,
        cert_pem,
        namespace,
        cluster,
    } = access
    else {
        return Err(ApiError::internal("not kubectl access details"));
    };
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let mut out = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {c}\n  cluster:\n    server: {server}\n{ca}    tls-server-name: {sni}\nusers:\n- name: {c}\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: {c}\n  context:\n    cluster: {c}\n    user: {c}\n",
        c = q(cluster),
        server = q(server),
        // No CA: the gateway serves a certificate from a public CA, which kubectl verifies
        // against the system roots.
        ca = if ca_pem.is_empty() {
            String::new()
        } else {
            format!("    certificate-authority-data: {}\n", b64(ca_pem))
        },
        sni = q(tls_server_name),
        cert = b64(cert_pem),
        key = b64(key.expose()),
    );
    if let Some(ns) = namespace {
        out.push_str(&format!("    namespace: {}\n", q(ns)));
    }
    out.push_str(&format!("current-context: {}\n", q(cluster)));
    Ok(out)
}

pub fn write(
    rec: &mut EndpointRecord,
    access: &EndpointAccess,
    secret: &Secret,
    home: &Path,
) -> Result<(), ApiError> {
    let EndpointAccess::Kubectl {
        tls_server_name,
        namespace,
        ..
    } = access
    else {
        return Err(ApiError::internal("not kubectl access details"));
    };
    let path = kubeconfig_path(home, rec, tls_server_name)?;
    super::write_private(&path, render(access, secret)?.as_bytes())?;
    let shown = path.display().to_string();
    eprintln!(
        "KUBECONFIG={shown} kubectl get pods{}",
        namespace
            .as_deref()
            .map(|n| format!(" -n {n}"))
            .unwrap_or_default()
    );
    rec.kubeconfig = Some(shown);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(short_name("aws_eks_cluster.main_cluster"), "main-cluster");
        assert_eq!(short_name("k8s"), "k8s");
        assert_eq!(short_name("x.__"), "cluster");
    }

    #[test]
    fn renders_a_kubeconfig_without_exec_plugin() {
        let access = EndpointAccess::Kubectl {
            server: "https://127.0.0.1:1234".into(),
            tls_server_name: "localhost".into(),
            ca_pem: "CA".into(),
            cert_pem: "CERT".into(),
            namespace: Some("my-app-prod".into()),
            cluster: "postern-ep_1".into(),
        };
        let text = render(&access, &Secret::new("KEY")).unwrap();
        assert!(text.contains("server: \"https://127.0.0.1:1234\""));
        assert!(text.contains("namespace: \"my-app-prod\""));
        assert!(text.contains("client-key-data: S0VZ"));
        assert!(text.contains("certificate-authority-data: Q0E="));
        assert!(!text.contains("exec"));
    }

    #[test]
    fn a_gateway_with_a_supplied_certificate_gets_no_ca_in_the_kubeconfig() {
        let access = EndpointAccess::Kubectl {
            server: "https://gw.example.com:6443".into(),
            tls_server_name: "gw.example.com".into(),
            ca_pem: String::new(),
            cert_pem: "CERT".into(),
            namespace: None,
            cluster: "postern-ep_1".into(),
        };
        let text = render(&access, &Secret::new("KEY")).unwrap();
        assert!(!text.contains("certificate-authority"), "{text}");
        assert!(text.contains("    server: \"https://gw.example.com:6443\"\n    tls-server-name: \"gw.example.com\"\n"), "{text}");
    }
}
