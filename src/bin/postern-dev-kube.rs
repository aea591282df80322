//! `postern-dev-kube --kubeconfig FILE`: the test Kubernetes API server (`src/kube_apiserver`)
//! as a process of its own, for `postern dev`'s demo appliance. It writes a kubeconfig that
//! reaches it directly (what the appliance holds), prints one JSON line `{"addr", "kubeconfig"}`
//! once it serves, and runs until SIGTERM or SIGINT.
//!
//! It is a separate binary of the umbrella package, not part of `postern`, so the gateway that
//! ships carries no fake API server: `postern dev` starts it when it finds it beside itself.

use anyhow::{bail, Context, Result};
use postern::kube_apiserver::KubeApiServer;
use std::path::PathBuf;
use tokio::signal::unix::{signal, SignalKind};

fn kubeconfig_arg() -> Result<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(path), None) if flag == "--kubeconfig" => Ok(PathBuf::from(path)),
        _ => bail!("usage: postern-dev-kube --kubeconfig FILE"),
    }
}

fn main() -> Result<()> {
    let path = kubeconfig_arg()?;
    let server = KubeApiServer::start()?;
    write_private(&path, &server.kubeconfig("my-app-prod"))
        .with_context(|| format!("writing {}", path.display()))?;
    println!(
        "{}",
        serde_json::json!({"addr": server.addr.to_string(), "kubeconfig": path.display().to_string()})
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        anyhow::Ok(())
    })?;
    drop(server);
    Ok(())
}

/// The kubeconfig holds the server's bearer token: 0600 from the start.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}
