//! Gateway start-up and shutdown: data dir, CA, store, relay, API, restored endpoints.

use crate::{
    agents::AgentRegistry,
    audit::AuditLog,
    config::{GatewayConfig, Limits},
    endpoints::{front_ends::FrontEndContext, EndpointRegistry},
    grants::{EndpointsOfGrant, Grants},
    identity::Caller,
    ops::Ops,
    ports::SystemClock,
    store::Store,
};
use anyhow::{bail, Context, Result};
use certs::Ca;
use jiff::Timestamp;
use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Weak},
    time::Duration,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The shared state of one gateway process.
#[derive(Debug)]
pub struct Gateway {
    pub store: Store,
    /// Shared with the services that record through it.
    pub audit: Arc<AuditLog>,
    /// The vendor trail's signed heads and the gateway audit key.
    pub audit_heads: Arc<crate::audit_heads::AuditHeads>,
    pub ca: Arc<Ca>,
    /// Shared with the services that reach agents through it.
    pub agents: Arc<AgentRegistry>,
    pub grants: Arc<Grants>,
    pub endpoints: Arc<EndpointRegistry>,
    /// The endpoint lifecycle: create, decide, retire, expire, restore.
    pub endpoint_service: Arc<crate::endpoints::Endpoints>,
    pub ops: Arc<Ops>,
    /// What waits for a customer approver, across grants, ops and endpoints.
    pub approvals: Arc<crate::approvals::Approvals>,
    /// The approval webhook: settings, the durable delivery queue and its worker.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    pub limits: Limits,
    /// Address endpoint listeners bind to.
    pub endpoint_host: IpAddr,
    /// The shared listeners of the kubectl, postgres and ssh endpoint types.
    pub front_ends: crate::endpoints::front_ends::FrontEnds,
    /// What the endpoint front ends (and their sessions) use of the gateway.
    pub front: Arc<FrontEndContext>,
    /// The gateway's server certificate (chain = leaf + CA) and key, for the TLS front ends.
    pub server_identity: certs::Issued,
    /// Where persistent keys live (the SSH host key, …).
    pub data_dir: PathBuf,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    /// The runtime the relay, endpoint listeners and sessions run on, apart from the control
    /// plane's: per-packet work stays on its own thread(s) without cross-thread wake-ups.
    pub data_plane: tokio::runtime::Handle,
    /// Steady-state snapshots on their way to the store (crate::steady_state_snapshots).
    pub snapshots: Arc<crate::steady_state_snapshots::SnapshotQueue>,
}

/// What was opened under a grant, ended through the endpoints module.
struct GatewayEndpoints(Weak<Gateway>);

#[async_trait::async_trait]
impl EndpointsOfGrant for GatewayEndpoints {
    async fn end_all_of_grant(
        &self,
        grant_id: &str,
        reason: endpoint_types::resource::CloseReason,
        caller: &Caller,
    ) {
        // Gone only while the gateway itself is being dropped: nothing is left to end.
        if let Some(gw) = self.0.upgrade() {
            gw.endpoint_service
                .end_all_of_grant(grant_id, reason, caller)
                .await;
        }
    }
}

/// Files in the data dir.
pub struct DataDir(pub PathBuf);

impl DataDir {
    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }
    pub fn admin_token(&self) -> PathBuf {
        self.0.join("admin.token")
    }
    pub fn relay_reset_key(&self) -> PathBuf {
        self.0.join("relay-reset.key")
    }
    pub fn database(&self) -> PathBuf {
        self.0.join("postern.db")
    }
}

/// A started gateway: its addresses, and the handle that stops it.
pub struct RunningGateway {
    pub gateway: Arc<Gateway>,
    pub api: SocketAddr,
    pub relay: SocketAddr,
    pub ca_fingerprint: String,
    pub ca_file: PathBuf,
    pub admin_token_file: PathBuf,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when asked for.
    pub metrics: Option<SocketAddr>,
    relay_endpoint: quinn::Endpoint,
    data_plane: DataPlane,
}

/// The data-plane runtime on threads of its own; stopped last.
struct DataPlane {
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataPlane {
    fn start(threads: usize) -> Result<(DataPlane, tokio::runtime::Handle)> {
        let runtime = if threads <= 1 {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("postern-data")
                .enable_all()
                .build()?
        };
        let handle = runtime.handle().clone();
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("postern-data".into())
            .spawn(move || runtime.block_on(stopped.cancelled()))?;
        Ok((
            DataPlane {
                stop,
                thread: Some(thread),
            },
            handle,
        ))
    }

    fn stop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunningGateway {
    /// The `--output json` line of `postern server` / `postern dev`.
    pub fn ready_json(&self) -> serde_json::Value {
        let mut ready = serde_json::json!({
            "api": self.api.to_string(),
            "relay": self.relay.to_string(),
            "ca_fingerprint": self.ca_fingerprint,
            "ca_file": self.ca_file,
            "admin_token_file": self.admin_token_file,
        });
        if let Some(m) = self.metrics {
            ready["metrics"] = serde_json::json!(m.to_string());
        }
        ready
    }

    /// Layered shutdown: stop accepting, cut sessions, tell agents, drain tasks with a grace
    /// period, close the QUIC endpoint and wait for it to go idle.
    pub async fn shutdown(mut self) {
        let gw = &self.gateway;
        gw.shutdown.cancel();
        gw.endpoints.cut_all_for_shutdown();
        self.relay_endpoint
            .close(quinn::VarInt::from_u32(0), b"gateway shutting down");
        gw.tasks.close();
        if tokio::time::timeout(Duration::from_secs(5), gw.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not finish within the shutdown grace period");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.relay_endpoint.wait_idle()).await;
        // The trail's end is signed last, so cutting it off is caught (crate::audit_heads).
        let _ = tokio::time::timeout(Duration::from_secs(2), gw.audit.flush()).await;
        if let Err(e) = gw.audit_heads.write_head(&gw.audit).await {
            tracing::error!(error = %e, "cannot sign the vendor trail's head at shutdown");
        }
        gw.store.close().await;
        // Joining blocks; the data plane has nothing left to do by now.
        let mut data_plane = std::mem::replace(
            &mut self.data_plane,
            DataPlane {
                stop: CancellationToken::new(),
                thread: None,
            },
        );
        let _ = tokio::task::spawn_blocking(move || data_plane.stop()).await;
    }
}

fn load_or_create_ca(dir: &DataDir) -> Result<Ca> {
    let (cert, key) = (dir.ca_cert(), dir.ca_key());
    match (cert.exists(), key.exists()) {
        (true, true) => {
            let cert_pem = std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            Ok(Ca::from_pem(&cert_pem, &key_pem).context("loading the gateway CA")?)
        }
        (false, false) => {
            let ca = Ca::generate("gateway", Timestamp::now()).context("creating the gateway CA")?;
            certs::write_private(&key, ca.key_pem().expose().as_bytes())
                .with_context(|| format!("writing {}", key.display()))?;
            std::fs::write(&cert, ca.cert_pem()).with_context(|| format!("writing {}", cert.display()))?;
            tracing::info!(fingerprint = %ca.fingerprint(), "created a new gateway CA");
            Ok(ca)
        }
        _ => bail!(
            "the data dir {} has only one of ca.crt and ca.key; restore the missing file or start with an empty data dir",
            dir.0.display()
        ),
    }
}

fn load_or_create_reset_key(dir: &DataDir) -> Result<Vec<u8>> {
    let path = dir.relay_reset_key();
    if let Ok(key) = std::fs::read(&path) {
        if key.len() == 64 {
            return Ok(key);
        }
        tracing::warn!(file = %path.display(), "relay reset key has the wrong size; making a new one");
    }
    let mut key = vec![0u8; 64];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    certs::write_private(&path, &key).with_context(|| format!("writing {}", path.display()))?;
    Ok(key)
}

/// Creates the bootstrap admin token when the store holds no admin (a new store); it is
/// written to the data dir only. A store that holds an admin while the file is missing is a
/// start-up error: minting a new admin silently would let anyone who can delete a file in
/// the data dir become admin unnoticed.
async fn ensure_admin_token(store: &Store, dir: &DataDir) -> Result<()> {
    let path = dir.admin_token();
    let admins = store.count_admin_tokens().await?;
    if admins > 0 {
        if path.exists() {
            return Ok(());
        }
        return Err(crate::admin_recovery::MissingAdminToken {
            path: absolute(&path),
            data_dir: absolute(&dir.0),
        }
        .into());
    }
    crate::admin_recovery::mint_admin_file(store, &path, "bootstrap-admin", None, "system:gateway")
        .await?;
    tracing::info!(file = %path.display(), "wrote the bootstrap admin token");
    Ok(())
}

fn server_sans(cfg: &GatewayConfig) -> Vec<String> {
    let mut sans: Vec<String> = vec!["127.0.0.1".into(), "::1".into(), "localhost".into()];
    for addr in [cfg.api, cfg.relay] {
        if !addr.ip().is_unspecified() {
            sans.push(addr.ip().to_string());
        }
    }
    sans.extend(cfg.server_names.iter().cloned());
    sans.sort();
    sans.dedup();
    sans
}

pub async fn start(cfg: GatewayConfig) -> Result<RunningGateway> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let dir = DataDir(cfg.data_dir.clone());
    let ca = load_or_create_ca(&dir)?;
    let store = match &cfg.store {
        Some(url) => Store::open(url)
            .await
            .with_context(|| format!("opening store {}", crate::store::redact_url(url)))?,
        None => {
            let db_path = dir.database();
            Store::open_sqlite(&db_path)
                .await
                .with_context(|| format!("opening store {}", db_path.display()))?
        }
    };
    ensure_admin_token(&store, &dir).await?;
    let audit = Arc::new(AuditLog::open(store.clone()).await?);
    let audit_heads = Arc::new(
        crate::audit_heads::AuditHeads::load_or_create(&dir.0)
            .context("loading the gateway audit key")?,
    );
    audit_heads.check_store_reaches_head(&audit).await?;

    let server_tls = ca
        .issue_server(
            &server_sans(&cfg),
            Timestamp::now(),
            Duration::from_secs(365 * 86_400),
        )
        .context("issuing the gateway server certificate")?;
    // The vendor's own certificate, reloaded on change (crate::tls_reload).
    let served_cert = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            crate::tls_reload::ReloadingCert::load(cert, key, crate::tls_reload::CHECK_EVERY)
                .context("loading tls_cert / tls_key")?,
        )),
        _ => None,
    };

    let front_ends = crate::endpoints::front_ends::bind(cfg.endpoint_host, &cfg.data_dir)
        .context("binding the endpoint front ends")?;
    let (data_plane, data_handle) =
        DataPlane::start(cfg.limits.data_plane_threads).context("starting the data plane")?;
    let ca = Arc::new(ca);
    let agents = Arc::new(AgentRegistry::default());
    let live_endpoints = Arc::new(EndpointRegistry::default());
    let (shutdown, tasks) = (CancellationToken::new(), TaskTracker::new());
    let data_dir = absolute(&cfg.data_dir);
    let doors = crate::admission::FrontDoors::new(cfg.limits.unauthenticated);
    let (metrics, registry) = crate::metrics::GatewayMetrics::new();
    audit.count_in(metrics.clone());
    let front = Arc::new(FrontEndContext {
        endpoints: live_endpoints.clone(),
        agents: agents.clone(),
        audit: audit.clone(),
        store: Arc::new(store.clone()),
        limits: cfg.limits.clone(),
        ca: ca.clone(),
        server_identity: server_tls.clone(),
        served_cert: served_cert.clone(),
        addrs: front_ends.addrs,
        endpoint_host: cfg.endpoint_host,
        data_dir: data_dir.clone(),
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
        doors: doors.clone(),
    });
    let webhooks = Arc::new(crate::webhooks::Webhooks::new(
        Arc::new(store.clone()),
        Arc::new(SystemClock),
        crate::webhooks::sealed::SecretBox::derive(&ca.key_pem())
            .context("deriving the webhook secrets' key")?,
    ));
    tasks.spawn(crate::webhooks::run(webhooks.clone(), shutdown.clone()));
    let notifier = webhooks.clone();
    let snapshots = Arc::new(crate::steady_state_snapshots::SnapshotQueue::default());
    tasks.spawn(snapshots.clone().run(store.clone(), shutdown.clone()));
    // Cyclic: grants end endpoints and endpoints ask grants, through the gateway's handle.
    let gateway = Arc::new_cyclic(|me: &Weak<Gateway>| {
        let grants = Arc::new(Grants::new(
            Arc::new(store.clone()),
            audit.clone(),
            Arc::new(SystemClock),
            agents.clone(),
            notifier.clone(),
            Arc::new(GatewayEndpoints(me.clone())),
        ));
        let endpoint_service = crate::endpoints::Endpoints::new(crate::endpoints::EndpointDeps {
            store: Arc::new(store.clone()),
            audit: audit.clone(),
            clock: Arc::new(SystemClock),
            agents: agents.clone(),
            notifier: notifier.clone(),
            grants: grants.clone(),
            front_ends: Arc::new(crate::endpoints::front_ends::FrontEndListeners {
                context: front.clone(),
                runtime: data_handle.clone(),
            }),
            live: live_endpoints.clone(),
            default_ttl: cfg.limits.default_endpoint_ttl,
            tasks: tasks.clone(),
            runtime: data_handle.clone(),
            shutdown: shutdown.clone(),
        });
        let ops = Ops::new(
            Arc::new(store.clone()),
            audit.clone(),
            Arc::new(SystemClock),
            agents.clone(),
            notifier.clone(),
            grants.clone(),
        );
        let ops = Arc::new(ops);
        let endpoint_service = Arc::new(endpoint_service);
        let approvals = Arc::new(crate::approvals::Approvals::new(
            vec![
                grants.clone(),
                ops.clone(),
                Arc::new(crate::approvals::EndpointQueue(endpoint_service.clone())),
            ],
            crate::approvals::Signing {
                store: Arc::new(store.clone()),
                policies: grants.clone(),
                clock: Arc::new(SystemClock),
            },
        ));
        Gateway {
            grants,
            ops,
            approvals,
            webhooks,
            store,
            audit,
            audit_heads: audit_heads.clone(),
            ca,
            agents,
            endpoints: live_endpoints,
            endpoint_service,
            limits: cfg.limits.clone(),
            endpoint_host: cfg.endpoint_host,
            front_ends: front_ends.addrs,
            front,
            server_identity: server_tls.clone(),
            data_dir,
            shutdown,
            tasks,
            data_plane: data_handle,
            snapshots: snapshots.clone(),
        }
    });

    let reset_key = load_or_create_reset_key(&dir)?;
    let denied = crate::denied_aggregate::DeniedTrail::new(
        cfg.limits.denied_window,
        cfg.limits.denied_max_sources,
    );
    let agent_rounds = Arc::new(crate::agent_rounds::AgentRounds::default());
    gateway.tasks.spawn(
        agent_rounds
            .clone()
            .run(gateway.store.clone(), gateway.shutdown.clone()),
    );
    let relay_state = Arc::new(crate::relay::Relay {
        store: gateway.store.clone(),
        audit: gateway.audit.clone(),
        ca: gateway.ca.clone(),
        agents: gateway.agents.clone(),
        grants: gateway.grants.clone(),
        endpoint_service: gateway.endpoint_service.clone(),
        ops: gateway.ops.clone(),
        front: gateway.front.clone(),
        limits: gateway.limits.clone(),
        shutdown: gateway.shutdown.clone(),
        tasks: gateway.tasks.clone(),
        audit_key: audit_heads.public_key().to_string(),
        gateway_heads: audit_heads.subscribe(),
        door: doors.relay.clone(),
        denied: denied.clone(),
        snapshots: gateway.snapshots.clone(),
        rounds: agent_rounds.clone(),
    });
    gateway.tasks.spawn(crate::grants::record_expiries(
        gateway.grants.clone(),
        gateway.shutdown.clone(),
    ));
    gateway.tasks.spawn(crate::denied_aggregate::run(
        denied,
        gateway.audit.clone(),
        gateway.shutdown.clone(),
    ));
    gateway.tasks.spawn(
        audit_heads
            .clone()
            .run(gateway.audit.clone(), gateway.shutdown.clone()),
    );
    let relay_endpoint = {
        // quinn spawns its endpoint driver on the runtime current at creation.
        let _in_data_plane = gateway.data_plane.enter();
        crate::relay::bind(&relay_state, &server_tls, cfg.relay, &reset_key)
            .with_context(|| format!("binding the relay on udp {}", cfg.relay))?
    };
    let relay = relay_endpoint.local_addr()?;
    gateway.tasks.spawn_on(
        crate::relay::serve(relay_state, relay_endpoint.clone()),
        &gateway.data_plane,
    );

    let api_listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .with_context(|| format!("binding the API on tcp {}", cfg.api))?;
    let api = api_listener.local_addr()?;
    if let Some(served) = &served_cert {
        gateway.tasks.spawn(crate::tls_reload::record_reloads(
            served.reloads(),
            gateway.audit.clone(),
            gateway.shutdown.clone(),
        ));
    }
    let api_tls = match served_cert {
        Some(served) => certs::server_config_with_resolver(
            served,
            None,
            certs::ClientAuth::None,
            vec![b"http/1.1".to_vec()],
        )?,
        None => certs::server_config(
            &server_tls.cert_pem,
            &server_tls.key_pem,
            None,
            certs::ClientAuth::None,
            vec![b"http/1.1".to_vec()],
        )?,
    };
    let api_state = Arc::new(crate::api::ApiState {
        store: gateway.store.clone(),
        audit: gateway.audit.clone(),
        audit_heads: gateway.audit_heads.clone(),
        ca_fingerprint: gateway.ca.fingerprint(),
        agents: gateway.agents.clone(),
        grants: gateway.grants.clone(),
        endpoint_service: gateway.endpoint_service.clone(),
        ops: gateway.ops.clone(),
        approvals: gateway.approvals.clone(),
        token_uses: Arc::new(crate::api_tokens::LastUse::default()),
        webhooks: gateway.webhooks.clone(),
        handshake_timeout: gateway.limits.handshake_timeout,
        door: doors.api.clone(),
        shutdown: gateway.shutdown.clone(),
        tasks: gateway.tasks.clone(),
    });
    gateway.tasks.spawn(crate::api::serve(
        api_state,
        api_listener,
        Arc::new(api_tls),
    ));

    {
        use crate::endpoints::{kube, postgres, ssh};
        let _in_data_plane = gateway.data_plane.enter();
        let listen = |l: std::net::TcpListener| {
            tokio::net::TcpListener::from_std(l).context("serving an endpoint front end")
        };
        let (k, p, s) = (
            listen(front_ends.kube)?,
            listen(front_ends.postgres)?,
            listen(front_ends.ssh)?,
        );
        gateway
            .tasks
            .spawn_on(kube::serve(gateway.front.clone(), k), &gateway.data_plane);
        gateway.tasks.spawn_on(
            postgres::serve(gateway.front.clone(), p),
            &gateway.data_plane,
        );
        gateway
            .tasks
            .spawn_on(ssh::serve(gateway.front.clone(), s), &gateway.data_plane);
    }
    gateway
        .endpoint_service
        .restore()
        .await
        .context("restoring endpoints from the store")?;
    let listening = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let metrics_addr = match cfg.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics listener on tcp {addr}"))?;
            let bound = listener.local_addr()?;
            let sources = crate::metrics::Sources {
                store: gateway.store.clone(),
                audit: (*gateway.audit).clone(),
                agents: gateway.agents.clone(),
                doors,
                listening: listening.clone(),
            };
            gateway.tasks.spawn(crate::metrics::serve(
                listener,
                metrics,
                registry,
                sources,
                gateway.shutdown.clone(),
            ));
            Some(bound)
        }
        None => None,
    };
    // Every listener is bound by now.
    listening.store(true, std::sync::atomic::Ordering::Release);

    Ok(RunningGateway {
        ca_fingerprint: gateway.ca.fingerprint(),
        gateway,
        api,
        relay,
        ca_file: absolute(&dir.ca_cert()),
        admin_token_file: absolute(&dir.admin_token()),
        metrics: metrics_addr,
        relay_endpoint,
        data_plane,
    })
}

pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
