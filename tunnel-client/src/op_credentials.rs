//! Credentials of `docker` and `cloud` resources, as the agent hands them to one op.
//!
//! The files agent.toml names stay root-owned 0600 where the customer keeps them; for each op
//! the agent copies what that resource names into the op's private directory (owned by the op
//! user, removed after) and points the tool at the copy. An op therefore sees the credentials
//! of the resource it was approved for and no other, and never the originals.
//!
//! | key | tool environment |
//! |---|---|
//! | `docker_host` | `DOCKER_HOST` |
//! | `docker_cert_path` (dir with ca.pem, cert.pem, key.pem) | copied; `DOCKER_CERT_PATH`, `DOCKER_TLS_VERIFY=1` |
//! | `aws_config_file`, `aws_credentials_file` | copied; `AWS_CONFIG_FILE`, `AWS_SHARED_CREDENTIALS_FILE` |
//! | `aws_profile`, `aws_region` | `AWS_PROFILE`, `AWS_REGION` and `AWS_DEFAULT_REGION` |
//! | `aws_role_arn` | a profile `postern-op` assuming the role from `aws_profile` (or `default`) |
//! | `gcloud_config` (a gcloud config dir) | copied; `CLOUDSDK_CONFIG` |
//! | `gcp_service_account`, `gcp_project` | `CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT`, `CLOUDSDK_CORE_PROJECT` |
//! | `azure_config_dir` | copied; `AZURE_CONFIG_DIR` |
//! | `digitalocean_token_file` | read; `DIGITALOCEAN_ACCESS_TOKEN` |

use crate::config::ResourceConfig;
use endpoint_types::resource::ResourceKind;
use std::{ffi::OsString, io, path::Path};

/// Largest credential tree copied for one op.
const COPY_LIMIT: u64 = 64 * 1024 * 1024;

/// Checked when agent.toml is loaded.
pub fn validate_config(r: &ResourceConfig) -> Result<(), String> {
    match r.kind {
        ResourceKind::Docker => {
            let host = r.docker_host.as_deref().unwrap_or_default();
            if !["unix://", "tcp://", "ssh://"]
                .iter()
                .any(|p| host.starts_with(p))
            {
                return Err(format!("kind = \"docker\" needs `docker_host` (unix://…, tcp://… or ssh://…), not {host:?}"));
            }
            if host.starts_with("tcp://") && r.docker_cert_path.is_none() {
                return Err("`docker_host` over tcp:// needs `docker_cert_path` (the daemon's TLS client files)".into());
            }
        }
        ResourceKind::Cloud => {
            let any = [
                r.aws_profile.is_some(),
                r.aws_role_arn.is_some(),
                r.aws_config_file.is_some(),
                r.aws_credentials_file.is_some(),
                r.gcloud_config.is_some(),
                r.gcp_service_account.is_some(),
                r.azure_config_dir.is_some(),
                r.digitalocean_token_file.is_some(),
            ];
            if !any.contains(&true) {
                return Err("kind = \"cloud\" needs credentials: aws_profile / aws_role_arn / aws_config_file / aws_credentials_file, gcloud_config / gcp_service_account, azure_config_dir or digitalocean_token_file".into());
            }
        }
        _ => {}
    }
    Ok(())
}

/// The environment for `tool` against `r`, with the credential files copied into `dir`.
pub fn prepare(
    r: &ResourceConfig,
    tool: &str,
    dir: &Path,
) -> io::Result<Vec<(&'static str, OsString)>> {
    let mut env: Vec<(&'static str, OsString)> = Vec::new();
    let copy = |from: &Path, name: &str| -> io::Result<OsString> {
        let to = dir.join(name);
        let mut budget = COPY_LIMIT;
        copy_tree(from, &to, &mut budget)?;
        Ok(to.into_os_string())
    };
    match (r.kind, tool) {
        (ResourceKind::Docker, "docker") => {
            if let Some(h) = &r.docker_host {
                env.push(("DOCKER_HOST", h.into()));
            }
            if let Some(p) = &r.docker_cert_path {
                env.push(("DOCKER_CERT_PATH", copy(p, "docker-certs")?));
                env.push(("DOCKER_TLS_VERIFY", "1".into()));
            }
            // The CLI's own config (contexts, credential helpers) stays out of reach.
            env.push(("DOCKER_CONFIG", dir.join(".docker").into_os_string()));
        }
        (ResourceKind::Cloud, "aws") => {
            let mut config = match &r.aws_config_file {
                Some(p) => read_limited(p)?,
                None => String::new(),
            };
            if let Some(p) = &r.aws_credentials_file {
                env.push(("AWS_SHARED_CREDENTIALS_FILE", copy(p, "aws-credentials")?));
            } else {
                env.push((
                    "AWS_SHARED_CREDENTIALS_FILE",
                    dir.join("aws-credentials").into_os_string(),
                ));
            }
            let profile = match &r.aws_role_arn {
                Some(arn) => {
                    let source = r.aws_profile.as_deref().unwrap_or("default");
                    config.push_str(&format!(
                        "\n[profile postern-op]\nrole_arn = {arn}\nsource_profile = {source}\n"
                    ));
                    Some("postern-op")
                }
                None => r.aws_profile.as_deref(),
            };
            let path = dir.join("aws-config");
            std::fs::write(&path, config)?;
            env.push(("AWS_CONFIG_FILE", path.into_os_string()));
            if let Some(p) = profile {
                env.push(("AWS_PROFILE", p.into()));
            }
            if let Some(region) = &r.aws_region {
                env.push(("AWS_REGION", region.into()));
                env.push(("AWS_DEFAULT_REGION", region.into()));
            }
        }
        (ResourceKind::Cloud, "gcloud") => {
            let config = match &r.gcloud_config {
                Some(p) => copy(p, "gcloud")?,
                None => dir.join("gcloud").into_os_string(),
            };
            env.push(("CLOUDSDK_CONFIG", config));
            if let Some(sa) = &r.gcp_service_account {
                env.push(("CLOUDSDK_AUTH_IMPERSONATE_SERVICE_ACCOUNT", sa.into()));
            }
            if let Some(p) = &r.gcp_project {
                env.push(("CLOUDSDK_CORE_PROJECT", p.into()));
            }
        }
        (ResourceKind::Cloud, "az") => {
            let config = match &r.azure_config_dir {
                Some(p) => copy(p, "azure")?,
                None => dir.join("azure").into_os_string(),
            };
            env.push(("AZURE_CONFIG_DIR", config));
        }
        (ResourceKind::Cloud, "doctl") => {
            if let Some(p) = &r.digitalocean_token_file {
                env.push(("DIGITALOCEAN_ACCESS_TOKEN", read_limited(p)?.trim().into()));
            }
        }
        _ => {}
    }
    Ok(env)
}

fn read_limited(p: &Path) -> io::Result<String> {
    if std::fs::metadata(p)?.len() > COPY_LIMIT {
        return Err(io::Error::other(format!(
            "{} is larger than 64 MiB",
            p.display()
        )));
    }
    std::fs::read_to_string(p)
}

/// Copies a file or a directory tree (files 0600, directories 0700; symlinks are not followed).
fn copy_tree(from: &Path, to: &Path, budget: &mut u64) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let meta = std::fs::symlink_metadata(from)?;
    if meta.is_dir() {
        std::fs::DirBuilder::new().mode(0o700).create(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()), budget)?;
        }
    } else if meta.is_file() {
        *budget = budget.checked_sub(meta.len()).ok_or_else(|| {
            io::Error::other(format!("{} is too large to copy for an op", from.display()))
        })?;
        let mut src = std::fs::File::open(from)?;
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(to)?;
        io::copy(&mut src, &mut dst)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentConfig;

    fn config(text: &str) -> Result<AgentConfig, String> {
        AgentConfig::parse(
            &format!("audit_path = \"a\"\n{text}"),
            Path::new("/etc/postern/agent.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn kinds_need_their_credentials() {
        assert!(config("[[resource]]\nid = \"d\"\nkind = \"docker\"\n")
            .unwrap_err()
            .contains("docker_host"));
        assert!(config(
            "[[resource]]\nid = \"d\"\nkind = \"docker\"\ndocker_host = \"tcp://10.0.0.5:2376\"\n"
        )
        .unwrap_err()
        .contains("docker_cert_path"));
        config("[[resource]]\nid = \"d\"\nkind = \"docker\"\ndocker_host = \"unix:///run/docker.sock\"\n").unwrap();
        assert!(config("[[resource]]\nid = \"c\"\nkind = \"cloud\"\n")
            .unwrap_err()
            .contains("needs credentials"));
        assert!(config("[[resource]]\nid = \"c\"\nkind = \"cloud\"\naws_profile = \"x\"\ndocker_host = \"unix:///x\"\n").unwrap_err().contains("docker key"));
        let c = config("[[resource]]\nid = \"c\"\nkind = \"cloud\"\naws_profile = \"ops\"\naws_config_file = \"aws/config\"\n").unwrap();
        assert_eq!(
            c.resources[0].aws_config_file.as_deref(),
            Some(Path::new("/etc/postern/aws/config"))
        );
        assert_eq!(c.descriptors(&Default::default())[0].scope, None);
    }

    #[test]
    fn aws_gets_a_copy_and_a_role_profile() {
        let src = tempfile::tempdir().unwrap();
        let op = tempfile::tempdir().unwrap();
        std::fs::write(
            src.path().join("config"),
            "[profile ops]\nregion = eu-west-1\n",
        )
        .unwrap();
        std::fs::write(
            src.path().join("credentials"),
            "[ops]\naws_access_key_id = AKIA\n",
        )
        .unwrap();
        let text = format!(
            "[[resource]]\nid = \"aws_account.main\"\nkind = \"cloud\"\naws_profile = \"ops\"\naws_role_arn = \"arn:aws:iam::1:role/vendor\"\n\
             aws_config_file = \"{0}/config\"\naws_credentials_file = \"{0}/credentials\"\naws_region = \"eu-west-1\"\n",
            src.path().display()
        );
        let c = config(&text).unwrap();
        let env = prepare(&c.resources[0], "aws", op.path()).unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string_lossy().into_owned())
                .unwrap()
        };
        assert_eq!(get("AWS_PROFILE"), "postern-op");
        assert_eq!(get("AWS_REGION"), "eu-west-1");
        let cfg = std::fs::read_to_string(get("AWS_CONFIG_FILE")).unwrap();
        assert!(
            cfg.contains("[profile ops]")
                && cfg.contains("role_arn = arn:aws:iam::1:role/vendor\nsource_profile = ops"),
            "{cfg}"
        );
        assert!(get("AWS_SHARED_CREDENTIALS_FILE").starts_with(&*op.path().to_string_lossy()));
        assert!(std::fs::read_to_string(get("AWS_SHARED_CREDENTIALS_FILE"))
            .unwrap()
            .contains("AKIA"));
        // Another cloud tool on the same resource gets no AWS credentials.
        assert!(prepare(&c.resources[0], "gcloud", op.path())
            .unwrap()
            .iter()
            .all(|(k, _)| !k.starts_with("AWS")));
    }
}
