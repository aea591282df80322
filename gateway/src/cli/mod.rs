//! The `postern` command line: gateway server, dev mode, and the operator/customer commands.

mod access;
mod approval_sign;
mod approver_key;
mod client;
mod completions;
mod control;
mod dev;
mod exit_codes;
mod kill_switch;
mod ops_list;
mod play;
mod profile;
mod status;
mod store_location;
mod teardown;
mod tokens;
mod usage;
mod wait_progress;
mod webhook;

use crate::server;
use clap::{Args, Parser, Subcommand, ValueEnum};
use client::ApiClient;
use endpoint_types::{
    api::*, duration::parse_duration, resource::EndpointType, ApiError, ErrorEnvelope,
};
use std::{path::PathBuf, process::ExitCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    name = "postern",
    version,
    about = "Postern: reach appliances in customers' clouds through an outbound tunnel, scoped, expiring and audited",
    after_help = exit_codes::EXIT_CODES_HELP
)]
struct Cli {
    /// `json` prints exactly one JSON document on stdout.
    #[arg(long, global = true, value_enum, default_value = "text")]
    output: OutputFormat,
    /// Gateway API address (the `api` of `postern server`).
    #[arg(long, global = true, env = "POSTERN_ADDR")]
    addr: Option<String>,
    /// API token.
    #[arg(long, global = true, env = "POSTERN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate the gateway API is verified with.
    #[arg(long, global = true, env = "POSTERN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A profile of ~/.config/postern/config.toml (`postern profile add`); --addr, --token,
    /// --ca-file and their environment variables win over it.
    #[arg(long, global = true, env = "POSTERN_PROFILE")]
    profile: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: control plane, QUIC relay, endpoint listeners.
    Server(ServerArgs),
    /// Gateway + embedded store + a local agent and demo appliance, for trying Postern out.
    Dev(DevArgs),
    /// API tokens for people and scripts: create, list, revoke.
    #[command(subcommand)]
    Token(tokens::TokenCmd),
    /// Gateway-host administration against the store (admin token recovery).
    #[command(subcommand)]
    Admin(tokens::AdminCmd),
    /// Named gateways for this CLI (~/.config/postern/config.toml).
    #[command(subcommand)]
    Profile(profile::ProfileCmd),
    /// Appliances and their enrollment.
    #[command(subcommand)]
    Appliance(ApplianceCmd),
    /// Permission phases (grants) on appliances.
    #[command(subcommand)]
    Access(control::AccessCmd),
    /// Customer decisions on grants, ops and endpoints.
    #[command(subcommand)]
    Approvals(control::ApprovalsCmd),
    /// Operations on appliances.
    #[command(subcommand)]
    Ops(OpsCmd),
    /// The vendor-side audit trail.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Show the identity of the current token.
    Whoami,
    /// Print a shell completion script on stdout (`postern completions bash > …`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: completions::Shell,
    },
    /// Write the man pages (postern.1 and one per subcommand) into a directory.
    Man {
        /// Where to write them (created if missing), e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
struct ServerArgs {
    #[command(flatten)]
    location: store_location::StoreLocation,
    /// API listen address (TCP).
    #[arg(long)]
    api: Option<std::net::SocketAddr>,
    /// Relay listen address (UDP).
    #[arg(long)]
    relay: Option<std::net::SocketAddr>,
    /// Lifetime of the agent certificates this gateway signs (default 90d; agents renew them
    /// over the tunnel two thirds into it).
    #[arg(long)]
    agent_cert_lifetime: Option<String>,
    /// Serve this certificate chain (PEM, leaf first) on the API instead of one the gateway CA
    /// issues, e.g. from a public CA; replaced files are picked up without a restart.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /healthz and /readyz on this TCP address (off by default;
    /// port 0 picks a free port, printed in the ready line).
    #[arg(long)]
    metrics: Option<std::net::SocketAddr>,
    /// Log lines on stderr as text or as one JSON object per line (filter: RUST_LOG).
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

pub use telemetry::LogFormat;

#[derive(Debug, Args)]
struct DevArgs {
    /// Where dev mode keeps its state (default: ~/.local/share/postern/dev).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ApplianceCmd {
    /// Register an appliance and print its one-time enrollment token.
    Add {
        /// The app the appliance runs.
        #[arg(long)]
        app: String,
        /// The customer whose cloud it runs in.
        #[arg(long)]
        customer: String,
        /// Lifetime of the enrollment token.
        #[arg(long, default_value = "1h")]
        token_ttl: String,
    },
    /// Appliances with presence.
    List,
    /// Cut the appliance's agent and refuse its certificate from now on.
    Revoke {
        /// The appliance's id.
        id: String,
    },
    /// The latest steady-state health snapshot per resource, with its age.
    Status(status::StatusArgs),
}

#[derive(Debug, Subcommand)]
enum OpsCmd {
    /// Short-lived ops endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Run a kubectl command in the appliance against the resource's cluster.
    Kubectl(control::OpArgs),
    /// Run psql in the appliance against the resource's database.
    Psql(control::OpArgs),
    /// Run ssh in the appliance.
    Ssh(control::OpArgs),
    /// Run docker in the appliance.
    Docker(control::OpArgs),
    /// Run the AWS CLI in the appliance.
    Aws(control::OpArgs),
    /// Run gcloud in the appliance.
    Gcloud(control::OpArgs),
    /// Run the Azure CLI in the appliance.
    Az(control::OpArgs),
    /// Run doctl in the appliance.
    Doctl(control::OpArgs),
    /// The ops you may see, oldest first, optionally filtered.
    List(ops_list::OpsListArgs),
    /// An op's record.
    Get {
        /// The op's id (op_…).
        id: String,
    },
    /// Wait until an op has ended, with progress on stderr; the exit code says how it ended.
    Wait {
        /// The op's id (op_…).
        id: String,
        /// Give up waiting after this long (exit 5, error WAIT_TIMEOUT; the op goes on).
        #[arg(long, default_value = wait_progress::DEFAULT_WAIT)]
        wait_timeout: String,
    },
}

#[derive(Debug, Subcommand)]
enum EndpointCmd {
    /// Open an endpoint to one of an appliance's resources.
    Create {
        /// What the stock client is: kubectl, postgres (psql and drivers), ssh, or plain tcp.
        #[arg(long = "type", value_parser = ["kubectl", "postgres", "ssh", "tcp"])]
        endpoint_type: String,
        /// The appliance's app.
        #[arg(long)]
        app: String,
        /// The appliance's customer.
        #[arg(long)]
        customer: String,
        /// The resource it reaches, by its id in the appliance's config.
        #[arg(long)]
        origin_resource_id: String,
        /// How long it lives; then every session is cut and its credentials stop working.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Wait until the endpoint is active (it is at once when no approval is needed), with
        /// progress on stderr.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (exit 5, error WAIT_TIMEOUT).
        #[arg(long, default_value = wait_progress::DEFAULT_WAIT)]
        wait_timeout: String,
        /// The phase it runs under: the grant it needs and the identity used at the target.
        #[arg(long, default_value = "operate")]
        phase: String,
    },
    /// An endpoint's record (with how to connect while it is active).
    Get {
        /// The endpoint's id (ep_…).
        id: String,
    },
    /// The endpoints you may see.
    List,
    /// Tear an endpoint down: every live session is cut, the credentials stop working.
    Retire {
        /// The endpoint's id (ep_…).
        id: String,
    },
    /// Local forwarder for a tcp endpoint: plain TCP on the listen address, TLS with the
    /// endpoint's client certificate to the gateway. Runs until SIGINT/SIGTERM.
    Connect {
        /// The tcp endpoint's id (ep_…).
        id: String,
        /// Where local clients connect (port 0: any free port, printed once bound).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Records, oldest first.
    List {
        /// Only the records about this appliance.
        #[arg(long)]
        appliance: Option<String>,
        /// An RFC 3339 time, or a duration meaning "that long ago" (`1h`).
        #[arg(long)]
        since: Option<String>,
        /// One page of at most N records (1–10000); `next_after_seq` in the output names the
        /// next page. Without --limit or --after-seq, every page is fetched.
        #[arg(long)]
        limit: Option<u32>,
        /// Only records after this sequence number (a page's `next_after_seq`).
        #[arg(long)]
        after_seq: Option<i64>,
    },
    /// All records as JSON lines, fetched a page at a time.
    Export,
    /// Check the hash chain, every signed head and agent anchor, and that the store still
    /// reaches the gateway's latest signed head (kept in its data dir).
    Verify,
    /// The latest signed head of an appliance's customer trail the gateway anchored, for
    /// `postern-agent audit verify --anchor FILE`.
    Anchor {
        /// The appliance's id.
        #[arg(long)]
        appliance: String,
    },
    /// Replay an SSH session's recording in this terminal.
    Play {
        /// The session id (`session_id` of its ssh.recording record).
        session: String,
        /// Pauses longer than this are shortened (`0s` plays without pauses).
        #[arg(long, default_value = "2s")]
        idle_limit: String,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
    },
    /// The signed teardown record of an ended endpoint, verified here against the gateway CA.
    Teardown {
        /// The endpoint id.
        endpoint: String,
    },
}

pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => return usage::report(e, &args),
    };
    let log_format = match &cli.command {
        Command::Server(args) => args.log_format,
        _ => LogFormat::Text,
    };
    let long_running = matches!(cli.command, Command::Server(_) | Command::Dev(_));
    telemetry::init_logs(if long_running { "info" } else { "warn" }, log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return fail(
                cli.output,
                &ApiError::internal(format!("cannot start the async runtime: {e}")),
            )
        }
    };
    let output = cli.output;
    match runtime.block_on(run(cli)) {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => fail(output, &e),
    }
}

pub use exit_codes::Outcome;

fn fail(output: OutputFormat, e: &ApiError) -> ExitCode {
    match output {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string(&ErrorEnvelope { error: e.clone() }).unwrap_or_default()
        ),
        OutputFormat::Text => {
            eprintln!("error: {}", e.message);
            if !e.hint.is_empty() {
                eprintln!("hint: {}", e.hint);
            }
        }
    }
    exit_codes::of_error(e)
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

fn duration_secs(flag: &str, s: &str) -> Result<u64, ApiError> {
    parse_duration(s).map(|d| d.as_secs()).map_err(|e| {
        ApiError::invalid(format!("--{flag}: {e}")).hint("durations look like 90s, 30m, 2h or 1d")
    })
}

async fn run(cli: Cli) -> Result<Outcome, ApiError> {
    let out = cli.output;
    let connection = profile::Connection {
        addr: cli.addr,
        token: cli.token,
        ca_file: cli.ca_file,
        profile: cli.profile,
    };
    let client = || connection.client();
    match cli.command {
        Command::Server(args) => run_server(args, out).await?,
        Command::Dev(args) => dev::run(args.data_dir, out)
            .await
            .map_err(|e| ApiError::internal(format!("{e:#}")))?,
        Command::Whoami => {
            let me: Identity = client()?.get("/v1/whoami").await?;
            match out {
                OutputFormat::Json => print_json(&me),
                OutputFormat::Text => println!(
                    "{} ({}{}), {}",
                    me.name,
                    me.role.as_str(),
                    me.customer
                        .map(|c| format!(", customer {c}"))
                        .unwrap_or_default(),
                    me.expires_at
                        .map(|t| format!("expires {t}"))
                        .unwrap_or_else(|| "never expires".into())
                ),
            }
        }
        Command::Token(cmd) => tokens::token(cmd, &client()?, out).await?,
        Command::Admin(cmd) => tokens::admin(cmd, out).await?,
        Command::Profile(cmd) => profile::run(cmd, out)?,
        Command::Appliance(cmd) => appliance(cmd, &client()?, out).await?,
        Command::Access(cmd) => control::access(cmd, &client()?, out).await?,
        Command::Approvals(control::ApprovalsCmd::Key(cmd)) => approver_key::run(cmd, out)?,
        Command::Approvals(cmd) => control::approvals(cmd, &client()?, out).await?,
        Command::Ops(OpsCmd::Endpoint(cmd)) => return endpoint(cmd, &client()?, out).await,
        Command::Ops(OpsCmd::Get { id }) => {
            return control::get_op(&id, None, &client()?, out).await
        }
        Command::Ops(OpsCmd::Wait { id, wait_timeout }) => {
            let limit =
                std::time::Duration::from_secs(duration_secs("wait-timeout", &wait_timeout)?);
            return control::get_op(&id, Some(limit), &client()?, out).await;
        }
        Command::Ops(OpsCmd::List(args)) => ops_list::run(args, &client()?, out).await?,
        Command::Completions { shell } => completions::completions(
            shell,
            <Cli as clap::CommandFactory>::command(),
            &mut std::io::stdout(),
        ),
        Command::Man { dir } => {
            let pages = completions::man_pages(<Cli as clap::CommandFactory>::command(), &dir)?;
            match out {
                OutputFormat::Json => {
                    print_json(&serde_json::json!({ "dir": dir, "pages": pages }))
                }
                OutputFormat::Text => {
                    println!("{} man pages written to {}", pages.len(), dir.display())
                }
            }
        }
        Command::Ops(op) => {
            use endpoint_types::control::OpTool;
            let (tool, args) = match op {
                OpsCmd::Kubectl(a) => (OpTool::Kubectl, a),
                OpsCmd::Psql(a) => (OpTool::Psql, a),
                OpsCmd::Ssh(a) => (OpTool::Ssh, a),
                OpsCmd::Docker(a) => (OpTool::Docker, a),
                OpsCmd::Aws(a) => (OpTool::Aws, a),
                OpsCmd::Gcloud(a) => (OpTool::Gcloud, a),
                OpsCmd::Az(a) => (OpTool::Az, a),
                OpsCmd::Doctl(a) => (OpTool::Doctl, a),
                OpsCmd::Endpoint(_)
                | OpsCmd::Get { .. }
                | OpsCmd::Wait { .. }
                | OpsCmd::List(_) => return Err(ApiError::internal("unreachable ops command")),
            };
            return control::run_op(tool, args, &client()?, out).await;
        }
        Command::Audit(cmd) => audit(cmd, &client()?, out).await?,
    }
    Ok(Outcome::Done)
}

async fn run_server(args: ServerArgs, out: OutputFormat) -> Result<(), ApiError> {
    let mut cfg = args.location.gateway_config()?;
    if let Some(a) = args.api {
        cfg.api = a;
    }
    if let Some(r) = args.relay {
        cfg.relay = r;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        cfg.tls_cert = Some(cert.clone());
        cfg.tls_key = Some(key.clone());
    }
    if let Some(text) = &args.agent_cert_lifetime {
        cfg.limits.agent_cert_lifetime = crate::cert_renewal::parse_lifetime(text)
            .map_err(|m| ApiError::invalid(format!("--agent-cert-lifetime: {m}")))?;
    }
    if let Some(m) = args.metrics {
        cfg.metrics = Some(m);
    }
    let running = server::start(cfg).await.map_err(|e| {
        match e.downcast_ref::<crate::admin_recovery::MissingAdminToken>() {
            Some(missing) => ApiError::invalid(missing.to_string()).hint(missing.hint()),
            None => ApiError::internal(format!("{e:#}")),
        }
    })?;
    match out {
        OutputFormat::Json => print_json(&running.ready_json()),
        OutputFormat::Text => {
            println!("postern gateway is up");
            println!("  api    https://{}", running.api);
            println!("  relay  udp {}", running.relay);
            if let Some(m) = running.metrics {
                println!("  metrics http://{m}/metrics");
            }
            println!(
                "  CA     {} ({})",
                running.ca_fingerprint,
                running.ca_file.display()
            );
            println!("  admin token file {}", running.admin_token_file.display());
        }
    }
    server::shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

async fn appliance(cmd: ApplianceCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    match cmd {
        ApplianceCmd::Add {
            app,
            customer,
            token_ttl,
        } => {
            let ttl = duration_secs("token-ttl", &token_ttl)?;
            let a: ApplianceAdded = c
                .post(
                    "/v1/appliances",
                    serde_json::json!({"app": app, "customer": customer, "token_ttl_s": ttl}),
                )
                .await?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "appliance_id": a.appliance_id, "token": a.token.expose(), "expires_at": a.expires_at,
                    "ca_fingerprint": a.ca_fingerprint, "app": a.app, "customer": a.customer,
                })),
                OutputFormat::Text => {
                    println!(
                        "appliance {} registered for {} / {}",
                        a.appliance_id, a.app, a.customer
                    );
                    println!("gateway CA: {}", a.ca_fingerprint);
                    println!("one-time enrollment token (expires {}):", a.expires_at);
                    println!("  {}", a.token.expose());
                    println!("in the appliance: postern-agent enroll --gateway RELAY_HOST:PORT --token <token> --config agent.toml");
                }
            }
        }
        ApplianceCmd::List => {
            let l: ApplianceList = c.get("/v1/appliances").await?;
            match out {
                OutputFormat::Json => print_json(&l),
                OutputFormat::Text => {
                    println!(
                        "{:<20} {:<16} {:<16} {:<8} {:<10} {:<28} LAST SEEN",
                        "APPLIANCE", "APP", "CUSTOMER", "ONLINE", "VERSION", "CERT EXPIRES"
                    );
                    for a in l.appliances {
                        let state = if a.revoked {
                            "revoked"
                        } else if a.online {
                            "yes"
                        } else if a.enrolled {
                            "no"
                        } else {
                            "pending"
                        };
                        println!(
                            "{:<20} {:<16} {:<16} {:<8} {:<10} {:<28} {}",
                            a.appliance_id,
                            a.app,
                            a.customer,
                            state,
                            a.agent_version.unwrap_or_else(|| "-".into()),
                            a.cert_expires_at
                                .map(|t| t.to_string())
                                .unwrap_or_else(|| "-".into()),
                            a.last_seen
                                .map(|t| t.to_string())
                                .unwrap_or_else(|| "-".into())
                        );
                    }
                }
            }
        }
        ApplianceCmd::Status(args) => status::run(args, c, out).await?,
        ApplianceCmd::Revoke { id } => {
            let a: ApplianceRecord = c
                .post(
                    &format!("/v1/appliances/{id}/revoke"),
                    serde_json::json!({}),
                )
                .await?;
            match out {
                OutputFormat::Json => print_json(&a),
                OutputFormat::Text => println!(
                    "appliance {} revoked: its agent is cut and its certificate refused",
                    a.appliance_id
                ),
            }
        }
    }
    Ok(())
}

fn print_endpoint_text(e: &EndpointRecord) {
    println!(
        "endpoint {} ({}) {} — {} on {} ({}/{})",
        e.id,
        e.endpoint_type,
        e.state.as_str(),
        e.origin_resource_id,
        e.appliance_id,
        e.app,
        e.customer
    );
    println!(
        "  expires {}   live sessions {}   total {}",
        e.expires_at, e.sessions, e.sessions_total
    );
    if let Some(path) = &e.kubeconfig {
        println!("  kubeconfig written to {path}; try:");
        println!("  KUBECONFIG={path} kubectl get pods");
    } else if let Some(cs) = &e.connection_string {
        println!("  connect with:");
        println!("  psql \"{cs}\"");
    } else if let Some(cmd) = &e.ssh_command {
        println!("  connect with:");
        println!("  {cmd}");
    } else if let Some(cmd) = &e.connect_command {
        println!("  forward a local port to it (TLS with the endpoint's client certificate) with:");
        println!("  {cmd}");
    } else if let Some(a) = &e.address {
        println!("  listening at {a} (TLS with the endpoint's client certificate)");
    }
    if let Some(n) = e.sessions_cut {
        println!("  sessions cut: {n}");
    }
}

async fn endpoint(cmd: EndpointCmd, c: &ApiClient, out: OutputFormat) -> Result<Outcome, ApiError> {
    let mut outcome = Outcome::Done;
    let rec: EndpointRecord = match cmd {
        EndpointCmd::Create {
            endpoint_type,
            app,
            customer,
            origin_resource_id,
            ttl,
            wait,
            wait_timeout,
            phase,
        } => {
            let t = EndpointType::parse(&endpoint_type).ok_or_else(|| {
                ApiError::invalid(format!("unknown endpoint type {endpoint_type}"))
            })?;
            let ttl_s = duration_secs("ttl", &ttl)?;
            let wait_limit =
                std::time::Duration::from_secs(duration_secs("wait-timeout", &wait_timeout)?);
            let credential = access::prepare(t)?;
            let mut rec: EndpointRecord = c
                .post("/v1/endpoints", serde_json::json!({
                    "type": t, "app": app, "customer": customer, "origin_resource_id": origin_resource_id, "ttl_s": ttl_s,
                    "phase": phase,
                    "credential": credential.as_ref().map(|(public, _)| public),
                }))
                .await?;
            if let Some((_, secret)) = &credential {
                access::save_pending(&access::home()?, &rec.id, secret)?;
            }
            // Under a policy that needs a person, wait (bounded) for the customer's decision.
            if wait && rec.state == EndpointState::PendingApproval {
                let path = format!("/v1/endpoints/{}", rec.id);
                rec = wait_progress::wait(
                    wait_limit,
                    out,
                    async || c.get(&path).await,
                    wait_progress::endpoint_status,
                )
                .await?;
            }
            if wait && rec.state == EndpointState::Denied {
                outcome = Outcome::Denied;
            }
            rec
        }
        EndpointCmd::Get { id } => c.get(&format!("/v1/endpoints/{id}")).await?,
        EndpointCmd::Retire { id } => {
            c.post(&format!("/v1/endpoints/{id}/retire"), serde_json::json!({}))
                .await?
        }
        EndpointCmd::Connect { id, listen } => {
            access::tcp::connect(c, &id, listen, out).await?;
            return Ok(Outcome::Done);
        }
        EndpointCmd::List => {
            let l: EndpointList = c.get("/v1/endpoints").await?;
            match out {
                OutputFormat::Json => print_json(&l),
                OutputFormat::Text => {
                    println!(
                        "{:<20} {:<8} {:<10} {:<28} {:<9} {:<21} ADDRESS",
                        "ENDPOINT", "TYPE", "STATE", "RESOURCE", "SESSIONS", "EXPIRES"
                    );
                    for e in l.endpoints {
                        println!(
                            "{:<20} {:<8} {:<10} {:<28} {:<9} {:<21} {}",
                            e.id,
                            e.endpoint_type.as_str(),
                            e.state.as_str(),
                            e.origin_resource_id,
                            e.sessions,
                            e.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
                            e.address.unwrap_or_else(|| "-".into())
                        );
                    }
                }
            }
            return Ok(Outcome::Done);
        }
    };
    let mut rec = rec;
    access::complete(&mut rec)?;
    // The files hold everything needed to connect; the record printed need not repeat it.
    rec.access = None;
    match out {
        OutputFormat::Json => print_json(&rec),
        OutputFormat::Text => print_endpoint_text(&rec),
    }
    Ok(outcome)
}

/// One page of `GET /v1/audit` after `after_seq`, with the other query terms.
async fn audit_page(
    c: &ApiClient,
    query: &[String],
    after_seq: i64,
) -> Result<AuditList, ApiError> {
    let mut terms = query.to_vec();
    terms.push(format!("after_seq={after_seq}"));
    c.get(&format!("/v1/audit?{}", terms.join("&"))).await
}

/// Every page in order, each handed to `each` as it arrives (bounded by the trail's length:
/// every page moves `after_seq` forward or ends the walk).
async fn audit_pages(
    c: &ApiClient,
    query: &[String],
    mut each: impl FnMut(Vec<AuditRecord>),
) -> Result<(), ApiError> {
    let mut after = 0;
    loop {
        let page = audit_page(c, query, after).await?;
        each(page.records);
        match page.next_after_seq {
            Some(seq) if seq > after => after = seq,
            _ => return Ok(()),
        }
    }
}

async fn audit(cmd: AuditCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    match cmd {
        AuditCmd::List {
            appliance,
            since,
            limit,
            after_seq,
        } => {
            let mut query = Vec::new();
            if let Some(a) = appliance {
                query.push(format!("appliance={a}"));
            }
            if let Some(s) = since {
                let t = match s.parse::<jiff::Timestamp>() {
                    Ok(t) => t,
                    Err(_) => {
                        let d = parse_duration(&s).map_err(|e| {
                            ApiError::invalid(format!("--since: {e}"))
                                .hint("give an RFC 3339 time or a duration like 1h")
                        })?;
                        jiff::Timestamp::now() - jiff::SignedDuration::from_secs(d.as_secs() as i64)
                    }
                };
                query.push(format!("since={t}"));
            }
            let one_page = limit.is_some() || after_seq.is_some();
            if let Some(n) = limit {
                query.push(format!("limit={n}"));
            }
            let l = if one_page {
                audit_page(c, &query, after_seq.unwrap_or(0)).await?
            } else {
                let mut all = Vec::new();
                audit_pages(c, &query, |page| all.extend(page)).await?;
                AuditList {
                    records: all,
                    next_after_seq: None,
                }
            };
            match out {
                OutputFormat::Json => print_json(&l),
                OutputFormat::Text => {
                    for r in l.records {
                        println!(
                            "{:>5} {} {:<18} {:<24} {} {}",
                            r.seq,
                            r.time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            r.kind,
                            r.actor,
                            [r.appliance_id, r.endpoint_id, r.session_id]
                                .into_iter()
                                .flatten()
                                .collect::<Vec<_>>()
                                .join(" "),
                            r.detail
                        );
                    }
                    if let Some(seq) = l.next_after_seq {
                        eprintln!("more records follow: --after-seq {seq}");
                    }
                }
            }
        }
        AuditCmd::Export => {
            audit_pages(c, &[], |page| {
                for r in page {
                    print_json(&r);
                }
            })
            .await?;
        }
        AuditCmd::Play {
            session,
            idle_limit,
            speed,
        } => {
            let idle = parse_duration(&idle_limit)
                .map_err(|e| ApiError::invalid(format!("--idle-limit: {e}")))?;
            play::play(c, &session, idle, speed, matches!(out, OutputFormat::Json)).await?;
        }
        AuditCmd::Teardown { endpoint } => teardown::show(c, &endpoint, out).await?,
        AuditCmd::Verify => {
            let v: AuditVerified = c.get("/v1/audit/verify").await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Text => {
                    let heads = v.heads.clone().unwrap_or_default();
                    println!(
                        "audit chain intact: {} records, {} signed heads, {} agent anchors",
                        v.records, heads.heads, heads.anchors
                    )
                }
            }
        }
        AuditCmd::Anchor { appliance } => {
            let v: serde_json::Value = c
                .get(&format!("/v1/audit/anchor?appliance={appliance}"))
                .await?;
            print_json(&v);
        }
    }
    Ok(())
}
