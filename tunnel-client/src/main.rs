//! `postern-agent`: the CLI shell. Every outcome is either one result document or one
//! structured error (`--output json` puts exactly one JSON document on stdout).

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use endpoint_types::{error::ErrorEnvelope, frame::HelloAck, ApiError, ErrorCode};
use serde_json::json;
use std::{path::PathBuf, process::ExitCode};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tunnel_client::{config::AgentConfig, enroll, tunnel};

#[derive(Parser)]
#[command(
    name = "postern-agent",
    version,
    about = "Postern's tunnel client: runs inside the customer's appliance"
)]
struct Cli {
    /// Output format; `json` prints exactly one JSON document on stdout.
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this appliance with a one-time token from `postern appliance add`.
    Enroll {
        /// The gateway's relay address, HOST:PORT.
        #[arg(long)]
        gateway: String,
        /// The enrollment token (pse1_…).
        #[arg(long, env = "POSTERN_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The agent's config file; created if it does not exist.
        #[arg(long)]
        config: PathBuf,
    },
    /// Keep the tunnel to the gateway up until SIGINT/SIGTERM.
    Run {
        /// The agent's config file (agent.toml).
        #[arg(long)]
        config: PathBuf,
        /// Serve /metrics (Prometheus), /healthz and /readyz on this TCP address (off by
        /// default; port 0 picks a free port, named in the `connected` JSON line and the log).
        #[arg(long)]
        metrics: Option<std::net::SocketAddr>,
        /// Log lines on stderr as text or as one JSON object per line (filter: RUST_LOG).
        #[arg(long, value_enum, default_value = "text")]
        log_format: telemetry::LogFormat,
    },
    /// The customer's own audit trail.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the trail at `audit_path`, every signed head and gateway
    /// anchor in it, and that it still reaches its latest signed head (kept beside it, and
    /// `--anchor`: the head the gateway anchored, from `postern audit anchor --appliance ID`).
    Verify {
        /// The agent's config file (agent.toml); the trail is its `audit_path`.
        #[arg(long)]
        config: PathBuf,
        /// The head the gateway anchored (`postern audit anchor --appliance ID` saved to a file).
        #[arg(long)]
        anchor: Option<PathBuf>,
    },
    /// The gateway's records in the trail: every request, decision and outcome concerning
    /// this appliance, numbered by the gateway; says whether any number is missing.
    Requests {
        /// The agent's config file (agent.toml); the trail is its `audit_path`.
        #[arg(long)]
        config: PathBuf,
    },
}

/// A successful command's result: the JSON document, and what text mode prints instead.
struct Report {
    json: Option<serde_json::Value>,
    text: Option<String>,
}

fn main() -> ExitCode {
    // Started by the agent to become an op's tool: never returns then.
    tunnel_client::op_launcher::run_if_invoked();
    tunnel_client::malloc_policy::fix_mmap_threshold();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let output = cli.output;
    let (verbose, log_format) = match &cli.command {
        Command::Run { log_format, .. } => (true, *log_format),
        _ => (false, telemetry::LogFormat::Text),
    };
    telemetry::init_logs(if verbose { "info" } else { "warn" }, log_format);
    // One thread: an agent's work is I/O-bound, and keeping QUIC and the sessions on one
    // thread avoids cross-thread wake-ups on every packet (measured: more throughput and lower
    // latency than a multi-threaded runtime; see examples/tunnel_bench.rs).
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("{e:#}")))
        .and_then(|rt| rt.block_on(dispatch(cli.command, output)));
    match result {
        Ok(report) => {
            match output {
                Output::Json => {
                    if let Some(doc) = report.json {
                        println!("{doc}");
                    }
                }
                Output::Text => {
                    if let Some(text) = report.text {
                        println!("{text}");
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_error(&e, output);
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command, output: Output) -> Result<Report, ApiError> {
    match command {
        Command::Enroll {
            gateway,
            token,
            config,
        } => {
            let done = enroll::enroll(&gateway, &token, &config)
                .await
                .map_err(|e| e.to_api_error())?;
            let text = format!(
                "enrolled appliance {} ({}/{}); run: postern-agent run --config {}",
                done.appliance_id,
                done.app,
                done.customer,
                done.config.display()
            );
            Ok(Report {
                json: Some(json!(done)),
                text: Some(text),
            })
        }
        Command::Run {
            config, metrics, ..
        } => run(config, metrics, output).await,
        Command::Audit {
            command: AuditCommand::Verify { config, anchor },
        } => {
            let config = AgentConfig::load(&config).map_err(|e| e.to_api_error())?;
            let inputs = tunnel_client::trail_heads::VerifyInputs::load(
                &config.audit_path,
                config.cert_file.as_deref(),
                config.ca_file.as_deref(),
                anchor.as_deref(),
            )
            .map_err(|e| e.to_api_error())?;
            let verified = tunnel_client::trail_heads::verify(&inputs)?;
            let heads = verified.heads.clone().unwrap_or_default();
            let text = format!(
                "the audit trail {} is intact: {} records, {} signed heads, {} gateway anchors{}",
                config.audit_path.display(),
                verified.records,
                heads.heads,
                heads.anchors,
                if heads.compared_with.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; it reaches the latest head of the {}",
                        heads.compared_with.join(" and the ")
                    )
                }
            );
            Ok(Report {
                json: Some(json!(verified)),
                text: Some(text),
            })
        }
        Command::Audit {
            command: AuditCommand::Requests { config },
        } => {
            let config = AgentConfig::load(&config).map_err(|e| e.to_api_error())?;
            let listing = tunnel_client::gateway_trail::list_file(&config.audit_path)
                .map_err(|e| e.to_api_error())?;
            let mut text: Vec<String> = listing
                .records
                .iter()
                .map(|r| {
                    let about = r
                        .op_id
                        .as_deref()
                        .or(r.endpoint_id.as_deref())
                        .unwrap_or("");
                    format!(
                        "#{:<5} {}  {:<18} {:<28} {about}  (trail seq {})",
                        r.number, r.time, r.kind, r.actor, r.seq
                    )
                })
                .collect();
            text.push(
                if listing.missing.is_empty() && listing.repeated.is_empty() {
                    format!(
                        "{} gateway records, numbered 1 to {} without a gap",
                        listing.records.len(),
                        listing.last_number
                    )
                } else {
                    format!(
                        "gateway records missing: {:?}; repeated: {:?}",
                        listing.missing, listing.repeated
                    )
                },
            );
            Ok(Report {
                json: Some(json!(listing)),
                text: Some(text.join("\n")),
            })
        }
    }
}

async fn run(
    config_path: PathBuf,
    metrics_addr: Option<std::net::SocketAddr>,
    output: Output,
) -> Result<Report, ApiError> {
    let mut config = AgentConfig::load(&config_path).map_err(|e| e.to_api_error())?;
    // Ops start through this very executable (see op_launcher); /proc/self/exe stays this
    // binary even if a package upgrade replaces the file.
    config.ops.launcher = Some(PathBuf::from("/proc/self/exe")).filter(|p| p.exists());
    tunnel_client::postgres::check_owner_roles(&config).await?;
    if !config.approvers.is_empty() {
        // Said plainly: what the keys protect.
        tracing::info!(
            approvers = config.approvers.len(),
            "[[approver]] keys listed: a grant, an endpoint and an op command the policy reserves for a person, and the release of held output, are honoured only with a decision one of these keys signed for exactly it"
        );
    } else {
        tracing::warn!(
            config = %config_path.display(),
            "no [[approver]] keys in the config: a decision the policy reserves for a person is taken on the gateway's word, so a compromised vendor gateway could approve on its own; list your approvers' public keys (postern approvals key create prints one) to make your own keys the root of trust"
        );
    }
    let gateway = config.gateway.clone();
    let appliance_id = config.appliance_id.clone();
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let metrics_bound = match metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                ApiError::invalid(format!("cannot bind the metrics listener on {addr}: {e}"))
                    .hint("pick a free address for --metrics (port 0: any free port)")
            })?;
            let bound = listener
                .local_addr()
                .map_err(|e| ApiError::internal(format!("the metrics listener: {e}")))?;
            let (metrics, registry) = tunnel_client::metrics::AgentMetrics::new();
            config.metrics = Some(metrics.clone());
            tokio::spawn(telemetry::serve(
                listener,
                registry,
                tunnel_client::metrics::AgentProbe(metrics),
                shutdown.clone(),
            ));
            tracing::info!(metrics = %bound, "serving /metrics, /healthz and /readyz");
            Some(bound)
        }
        None => None,
    };
    let (ready_tx, ready_rx) = oneshot::channel::<HelloAck>();
    // The JSON document goes out once the first hello is accepted, so a script can wait for it.
    let announce = tokio::spawn({
        let gateway = gateway.clone();
        async move {
            let Ok(ack) = ready_rx.await else {
                return false;
            };
            if output == Output::Json {
                let doc = json!({
                    "connected": true,
                    "appliance_id": ack.appliance_id,
                    "app": ack.app,
                    "customer": ack.customer,
                    "gateway": gateway,
                    "metrics": metrics_bound.map(|m| m.to_string()),
                });
                println!("{doc}");
            }
            true
        }
    });
    let result = tunnel::run(config, shutdown, Some(ready_tx)).await;
    let announced = announce.await.unwrap_or(false);
    result.map_err(|e| e.to_api_error())?;
    let json = (!announced)
        .then(|| json!({ "connected": false, "appliance_id": appliance_id, "gateway": gateway }));
    Ok(Report { json, text: None })
}

async fn stop_on_signal(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); only SIGINT stops the agent");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("stopping: cutting sessions and closing the tunnel");
    shutdown.cancel();
}

fn print_error(e: &ApiError, output: Output) {
    match output {
        Output::Json => {
            let doc =
                serde_json::to_string(&ErrorEnvelope { error: e.clone() }).unwrap_or_else(|_| {
                    json!({ "error": { "code": "INTERNAL", "message": e.message } }).to_string()
                });
            println!("{doc}");
        }
        Output::Text => {
            eprintln!("error: {}", e.message);
            if !e.hint.is_empty() {
                eprintln!("hint: {}", e.hint);
            }
        }
    }
}

/// Clap's own errors, structured when the caller asked for JSON.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let args: Vec<String> = std::env::args().collect();
    let wants_json = args.iter().any(|a| a == "--output=json")
        || args
            .windows(2)
            .any(|w| matches!(w, [flag, value] if flag == "--output" && value == "json"));
    if !wants_json {
        e.exit();
    }
    let rendered = e.render().to_string();
    let message = rendered
        .lines()
        .next()
        .unwrap_or_default()
        .trim_start_matches("error: ")
        .to_string();
    print_error(
        &ApiError::invalid(message)
            .hint("run `postern-agent --help` for usage")
            .details(json!({ "usage": rendered })),
        Output::Json,
    );
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Each command and argument without help text, by its path (`--help`/`--version` aside).
    fn without_help(cmd: &clap::Command, path: &str) -> Vec<String> {
        let args = cmd
            .get_arguments()
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|a| a.get_help().is_none() && a.get_long_help().is_none())
            .map(|a| format!("{path} {}", a.get_id()));
        let subs = cmd.get_subcommands().flat_map(|sub| {
            let here = format!("{path} {}", sub.get_name());
            let own = (sub.get_about().is_none() && sub.get_long_about().is_none())
                .then(|| format!("{here} (the command)"));
            own.into_iter().chain(without_help(sub, &here))
        });
        args.chain(subs).collect()
    }

    #[test]
    fn every_command_and_argument_has_help_text() {
        let mut cmd = Cli::command();
        cmd.build();
        let missing = without_help(&cmd, "postern-agent");
        assert!(
            missing.is_empty(),
            "without help text:\n{}",
            missing.join("\n")
        );
    }
}
