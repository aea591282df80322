//! The demo appliance's cluster: the test Kubernetes API server (`src/kube_apiserver` of the
//! umbrella package) run as its own process, `postern-dev-kube`, which `cargo build
//! --workspace` puts beside `postern`. The gateway binary itself carries no fake API server.

use super::process::DemoProcess;
use anyhow::{bail, Context, Result};
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

const BIN: &str = "postern-dev-kube";

pub struct DemoKube {
    pub process: DemoProcess,
    /// The kubeconfig that reaches it directly (what the appliance holds).
    pub kubeconfig: PathBuf,
}

/// `postern-dev-kube` beside this binary or on PATH. `Err` is the note for the user.
pub fn available() -> Result<PathBuf, String> {
    let beside = std::env::current_exe()
        .ok()
        .map(|me| me.with_file_name(BIN))
        .filter(|p| p.exists());
    beside
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|d| d.join(BIN))
                .find(|p| p.exists())
        })
        .ok_or_else(|| {
            format!("{BIN} (the test Kubernetes API server) is not beside postern: build it with `cargo build --workspace`")
        })
}

pub async fn start(bin: &Path, dir: &Path) -> Result<DemoKube> {
    std::fs::create_dir_all(dir)?;
    let kubeconfig = dir.join("cluster.kubeconfig");
    let log = std::fs::File::create(dir.join("apiserver.log"))?;
    let mut cmd = Command::new(bin);
    cmd.arg("--kubeconfig")
        .arg(&kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    let mut process =
        DemoProcess::spawn("kube-apiserver", &mut cmd, libc::SIGTERM).context("starting it")?;
    let Some(stdout) = process.child_mut().stdout.take() else {
        bail!("no stdout from {BIN}");
    };
    let mut lines = BufReader::new(stdout).lines();
    match tokio::time::timeout(Duration::from_secs(15), lines.next_line()).await {
        Ok(Ok(Some(_ready))) if kubeconfig.exists() => Ok(DemoKube {
            process,
            kubeconfig,
        }),
        _ => {
            process.stop(Duration::from_secs(2)).await;
            bail!(
                "{BIN} did not report ready; see {}",
                dir.join("apiserver.log").display()
            )
        }
    }
}
