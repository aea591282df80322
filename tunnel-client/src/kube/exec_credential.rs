//! Kubeconfig users that are exec credential plugins (`aws eks get-token`,
//! `gke-gcloud-auth-plugin`, `kubelogin`), run per client-go's protocol: the plugin gets
//! `KUBERNETES_EXEC_INFO` (an `ExecCredential` with `spec.interactive` and, when
//! `provideClusterInfo`, `spec.cluster`), prints an `ExecCredential` whose `status` holds a
//! bearer token or a client certificate and key, and optionally `expirationTimestamp`.
//!
//! The credential is cached until shortly before it expires (or until the API server answers
//! 401), and concurrent requests wait for one run. Each run is bounded in time and output. The
//! plugin, its arguments and environment come only from the appliance's own kubeconfig: nothing
//! a vendor sends reaches them.

use endpoint_types::secret::Secret;
use kube::config::{ExecConfig, ExecInteractiveMode};
use serde_json::Value;
use std::{
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::io::AsyncReadExt;

/// A plugin that has not answered by then is killed (a login prompt it cannot show, a hung
/// network call) and the request gets a clear error.
const RUN_LIMIT: Duration = Duration::from_secs(30);
const MAX_STDOUT: u64 = 1024 * 1024;
const MAX_STDERR: u64 = 16 * 1024;
/// Re-run this long before the expiry at most (a tenth of the lifetime for short ones), so a
/// request never leaves with a token about to lapse.
const REFRESH_MARGIN: Duration = Duration::from_secs(30);

const API_VERSIONS: [&str; 2] = [
    "client.authentication.k8s.io/v1",
    "client.authentication.k8s.io/v1beta1",
];

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("exec plugin: {0}")]
    Config(String),
    #[error("exec plugin {command:?} could not start: {message}")]
    Start { command: String, message: String },
    #[error("exec plugin {command:?} did not finish within {RUN_LIMIT:?}")]
    TimedOut { command: String },
    #[error("exec plugin {command:?} failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("exec plugin {command:?} printed an unusable ExecCredential: {message}")]
    Output { command: String, message: String },
}

/// What the plugin returned.
#[derive(Debug)]
pub struct Credential {
    pub token: Option<Secret>,
    /// (certificate PEM, key PEM)
    pub client: Option<(String, Secret)>,
    pub expires: Option<jiff::Timestamp>,
}

struct Cached {
    credential: Arc<Credential>,
    /// `None`: no expiry given, kept until the API server refuses it.
    refresh_at: Option<Instant>,
}

pub struct ExecPlugin {
    command: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    api_version: String,
    install_hint: Option<String>,
    /// `KUBERNETES_EXEC_INFO`, fixed for the plugin's life.
    exec_info: String,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for ExecPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecPlugin")
            .field("command", &self.command)
            .field("api_version", &self.api_version)
            .finish_non_exhaustive()
    }
}

impl ExecPlugin {
    /// From the kubeconfig user's `exec` (kube has already resolved a relative command
    /// against the kubeconfig's directory and filled `cluster` when `provideClusterInfo`).
    pub fn new(exec: &ExecConfig) -> Result<ExecPlugin, ExecError> {
        let command = exec
            .command
            .clone()
            .filter(|c| !c.trim().is_empty())
            .ok_or_else(|| ExecError::Config("`command` is required".into()))?;
        let api_version = exec.api_version.clone().unwrap_or_default();
        if !API_VERSIONS.contains(&api_version.as_str()) {
            return Err(ExecError::Config(format!(
                "apiVersion {api_version:?} is not supported: use {} or {}",
                API_VERSIONS[0], API_VERSIONS[1]
            )));
        }
        if exec.interactive_mode == Some(ExecInteractiveMode::Always) {
            return Err(ExecError::Config(
                "interactiveMode Always needs a terminal and the agent has none: use Never or IfAvailable".into(),
            ));
        }
        let mut env = Vec::new();
        for e in exec.env.iter().flatten() {
            match (e.get("name"), e.get("value")) {
                (Some(n), Some(v)) if !n.is_empty() => env.push((n.clone(), v.clone())),
                _ => {
                    return Err(ExecError::Config(
                        "each `env` entry needs a `name` and a `value`".into(),
                    ))
                }
            }
        }
        let mut spec = serde_json::json!({"interactive": false});
        if exec.provide_cluster_info {
            if let Some(cluster) = &exec.cluster {
                spec["cluster"] = serde_json::to_value(cluster)
                    .map_err(|e| ExecError::Config(format!("cluster info: {e}")))?;
            }
        }
        let exec_info = serde_json::json!({
            "apiVersion": api_version, "kind": "ExecCredential", "spec": spec,
        })
        .to_string();
        Ok(ExecPlugin {
            command,
            args: exec.args.clone().unwrap_or_default(),
            env,
            api_version,
            install_hint: exec.install_hint.clone(),
            exec_info,
            cached: tokio::sync::Mutex::new(None),
        })
    }

    /// The cached credential, or a fresh one from a new run of the plugin.
    pub async fn credential(&self) -> Result<Arc<Credential>, ExecError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.refresh_at.is_none_or(|at| Instant::now() < at) {
                return Ok(c.credential.clone());
            }
        }
        let out = self.run().await?;
        let now = jiff::Timestamp::now();
        let credential =
            Arc::new(
                parse(&out, &self.api_version).map_err(|message| ExecError::Output {
                    command: self.command.clone(),
                    message,
                })?,
            );
        let refresh_at = credential
            .expires
            .map(|exp| Instant::now() + refresh_after(now, exp));
        *cached = Some(Cached {
            credential: credential.clone(),
            refresh_at,
        });
        Ok(credential)
    }

    /// The API server refused the credential (401): the next request runs the plugin again.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    async fn run(&self) -> Result<Vec<u8>, ExecError> {
        tracing::info!(command = %self.command, "running the kubeconfig's exec credential plugin");
        let command = self.command.clone();
        let mut child = tokio::process::Command::new(&self.command)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("KUBERNETES_EXEC_INFO", &self.exec_info)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| ExecError::Start {
                command: command.clone(),
                message: match (&self.install_hint, e.kind()) {
                    (Some(hint), std::io::ErrorKind::NotFound) => format!("{e}; {hint}"),
                    _ => e.to_string(),
                },
            })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ExecError::Start {
                command,
                message: "no pipes".into(),
            });
        };
        // Each reader is dropped (its pipe closed) as soon as it is done, so a plugin that
        // writes past the cap dies of the closed pipe instead of blocking until the timeout.
        let read_all = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>, cap: u64| async move {
            let mut buf = Vec::new();
            pipe.take(cap).read_to_end(&mut buf).await.map(|_| buf)
        };
        let run = async {
            let (out, err, status) = tokio::join!(
                read_all(Box::new(stdout), MAX_STDOUT + 1),
                read_all(Box::new(stderr), MAX_STDERR),
                child.wait(),
            );
            match (out, err, status) {
                (Ok(out), Ok(err), Ok(status)) => (Ok(status), out, err),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                    (Err(e), Vec::new(), Vec::new())
                }
            }
        };
        // On timeout the child is dropped, and killed (kill_on_drop).
        let (status, out, err) =
            tokio::time::timeout(RUN_LIMIT, run)
                .await
                .map_err(|_| ExecError::TimedOut {
                    command: command.clone(),
                })?;
        let status = status.map_err(|e| ExecError::Start {
            command: command.clone(),
            message: e.to_string(),
        })?;
        // Checked first: a plugin cut off at the cap dies of the closed pipe.
        if out.len() as u64 > MAX_STDOUT {
            return Err(ExecError::Output {
                command,
                message: format!("more than {MAX_STDOUT} bytes"),
            });
        }
        if !status.success() {
            let stderr = String::from_utf8_lossy(&err);
            return Err(ExecError::Failed {
                command,
                status: status.to_string(),
                stderr: stderr.trim().chars().take(500).collect(),
            });
        }
        Ok(out)
    }
}

/// How long a credential expiring at `expires` (seen at `now`) is used before the plugin runs
/// again: up to [`REFRESH_MARGIN`] (or a tenth of its life) early; zero if already expired.
pub fn refresh_after(now: jiff::Timestamp, expires: jiff::Timestamp) -> Duration {
    let life = Duration::try_from(expires.duration_since(now)).unwrap_or(Duration::ZERO);
    life.saturating_sub(REFRESH_MARGIN.min(life / 10))
}

/// An `ExecCredential` the plugin printed, checked against the version it was asked for.
pub fn parse(out: &[u8], api_version: &str) -> Result<Credential, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| format!("not JSON: {e}"))?;
    if v["kind"] != "ExecCredential" {
        return Err(format!("kind is {}, not ExecCredential", v["kind"]));
    }
    if v["apiVersion"] != api_version {
        return Err(format!(
            "apiVersion is {}, but {api_version} was asked for",
            v["apiVersion"]
        ));
    }
    let status = v
        .get("status")
        .filter(|s| s.is_object())
        .ok_or("no `status`")?;
    let text = |k: &str| {
        status
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let token = text("token").map(|t| Secret::new(t.to_string()));
    let client = match (text("clientCertificateData"), text("clientKeyData")) {
        (Some(c), Some(k)) => Some((c.to_string(), Secret::new(k.to_string()))),
        (None, None) => None,
        _ => {
            return Err("clientCertificateData and clientKeyData come together".into());
        }
    };
    if token.is_none() && client.is_none() {
        return Err("status has neither a token nor a client certificate and key".into());
    }
    let expires = match status.get("expirationTimestamp") {
        None | Some(Value::Null) => None,
        Some(t) => Some(
            t.as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                .ok_or_else(|| format!("expirationTimestamp {t} is not RFC 3339"))?,
        ),
    };
    Ok(Credential {
        token,
        client,
        expires,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "client.authentication.k8s.io/v1";

    #[test]
    fn parses_tokens_certificates_and_expiry() {
        let c = parse(
            br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"token":"t0k","expirationTimestamp":"2030-01-01T00:00:00Z"}}"#,
            V1,
        )
        .unwrap();
        assert_eq!(c.token.unwrap().expose(), "t0k");
        assert_eq!(c.expires.unwrap().to_string(), "2030-01-01T00:00:00Z");
        let c = parse(
            br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"clientCertificateData":"C","clientKeyData":"K"}}"#,
            V1,
        )
        .unwrap();
        assert!(c.token.is_none() && c.expires.is_none());
        assert_eq!(c.client.unwrap().0, "C");
    }

    #[test]
    fn refuses_what_client_go_refuses() {
        for (out, want) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"kind":"Pod"}"#, "kind"),
            (
                br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1beta1","status":{"token":"t"}}"#,
                "apiVersion",
            ),
            (
                br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1"}"#,
                "status",
            ),
            (
                br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{}}"#,
                "neither",
            ),
            (
                br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"clientKeyData":"K"}}"#,
                "together",
            ),
            (
                br#"{"kind":"ExecCredential","apiVersion":"client.authentication.k8s.io/v1","status":{"token":"t","expirationTimestamp":"tomorrow"}}"#,
                "RFC 3339",
            ),
        ] {
            let e = parse(out, V1).err().unwrap_or_default();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn refreshes_shortly_before_expiry() {
        let now: jiff::Timestamp = "2030-01-01T00:00:00Z".parse().unwrap();
        let at = |s: i64| now + jiff::SignedDuration::from_secs(s);
        assert_eq!(refresh_after(now, at(900)), Duration::from_secs(870));
        assert_eq!(refresh_after(now, at(10)), Duration::from_secs(9));
        assert_eq!(refresh_after(now, at(-5)), Duration::ZERO);
    }

    fn config(json: &str) -> ExecConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn configuration_is_checked_up_front() {
        let e = ExecPlugin::new(&config(
            r#"{"command":"x","apiVersion":"client.authentication.k8s.io/v1alpha1"}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("v1alpha1"), "{e}");
        let e = ExecPlugin::new(&config(r#"{"command":"x","apiVersion":"client.authentication.k8s.io/v1","interactiveMode":"Always"}"#)).unwrap_err();
        assert!(e.to_string().contains("Always"), "{e}");
        let e = ExecPlugin::new(&config(
            r#"{"apiVersion":"client.authentication.k8s.io/v1"}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("command"), "{e}");
        let p = ExecPlugin::new(&config(r#"{"command":"x","apiVersion":"client.authentication.k8s.io/v1beta1","interactiveMode":"IfAvailable","env":[{"name":"A","value":"b"}]}"#)).unwrap();
        assert_eq!(p.env, vec![("A".to_string(), "b".to_string())]);
        assert!(p.exec_info.contains("\"interactive\":false"));
    }

    #[tokio::test]
    async fn a_failing_or_silent_plugin_is_a_clear_error() {
        let p = ExecPlugin::new(&config(r#"{"command":"sh","args":["-c","echo nope >&2; exit 4"],"apiVersion":"client.authentication.k8s.io/v1"}"#)).unwrap();
        let e = p.credential().await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains('4'), "{e}");
        let p = ExecPlugin::new(&config(r#"{"command":"/nonexistent/plugin","installHint":"install the plugin","apiVersion":"client.authentication.k8s.io/v1"}"#)).unwrap();
        let e = p.credential().await.unwrap_err().to_string();
        assert!(e.contains("install the plugin"), "{e}");
        // Output past the cap is refused rather than buffered.
        let p = ExecPlugin::new(&config(r#"{"command":"sh","args":["-c","head -c 2000000 /dev/zero"],"apiVersion":"client.authentication.k8s.io/v1"}"#)).unwrap();
        let e = p.credential().await.unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
    }
}
