//! The HTTPS API the CLI talks to. Every request is made as one identity (bearer token).

use crate::{
    agents::AgentRegistry,
    approvals::Approvals,
    audit::{AuditLog, Subject},
    endpoints::Endpoints,
    grants::Grants,
    identity::{self, Caller},
    ops::Ops,
    store::{ApplianceRow, AuditPageQuery, EnrollmentRow, Store},
};
use axum::{
    extract::{FromRequestParts, Path, State},
    http::{request::Parts, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use endpoint_types::{
    api::*,
    control::{Decision, GrantRecord, GrantRequest, OpRecord, OpRequest},
    duration::{format_duration, TTL_MAX},
    resource::{CloseReason, ResourceDescriptor},
    token::EnrollmentToken,
    ApiError, ErrorCode, ErrorEnvelope,
};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde::Deserialize;
use std::{sync::Arc, time::Duration};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What the API's handlers reach: the services, and the few gateway parts the appliance and
/// audit routes read directly. Built by `server.rs`.
#[derive(Debug)]
pub struct ApiState {
    pub store: Store,
    pub audit: Arc<AuditLog>,
    pub audit_heads: Arc<crate::audit_heads::AuditHeads>,
    /// Pinned by agents at enrollment; shown with enrollment tokens.
    pub ca_fingerprint: String,
    pub agents: Arc<AgentRegistry>,
    pub grants: Arc<Grants>,
    pub endpoint_service: Arc<Endpoints>,
    pub ops: Arc<Ops>,
    pub approvals: Arc<Approvals>,
    /// When each API token's last use was written (at most once a minute).
    pub token_uses: Arc<crate::api_tokens::LastUse>,
    /// The approval webhook's settings and deliveries.
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    pub handshake_timeout: Duration,
    /// Caps the unauthenticated TLS handshakes the API holds (`crate::admission`).
    pub door: Arc<crate::admission::Door>,
    pub shutdown: tokio_util::sync::CancellationToken,
    pub tasks: tokio_util::task::TaskTracker,
}

type Gw = Arc<ApiState>;

/// An API error as an HTTP response: the status of its code and `{"error": {...}}`.
pub struct Failure(pub ApiError);

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        Failure(e)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ErrorEnvelope { error: self.0 })).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, Failure>;

impl FromRequestParts<Gw> for Caller {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, gw: &Gw) -> Result<Self, Self::Rejection> {
        let bearer = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let caller = identity::authenticate(&gw.store, bearer).await?;
        gw.token_uses
            .note(&gw.store, &caller.token_id, crate::store::now())
            .await;
        Ok(caller)
    }
}

pub use crate::api_extract::{Body, Params};

pub fn router(gw: Gw) -> Router {
    Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tokens", post(token_create).get(token_list))
        .route("/v1/tokens/{id}/revoke", post(token_revoke))
        .route("/v1/appliances", post(appliance_add).get(appliance_list))
        .route("/v1/appliances/{id}/revoke", post(appliance_revoke))
        .route("/v1/appliances/{id}/status", get(appliance_status))
        .route("/v1/endpoints", post(endpoint_create).get(endpoint_list))
        .route("/v1/endpoints/{id}", get(endpoint_get))
        .route("/v1/endpoints/{id}/retire", post(endpoint_retire))
        .route("/v1/grants", post(grant_request).get(grant_list))
        .route("/v1/grants/revoke", post(grant_revoke_customer))
        .route("/v1/grants/{id}", get(grant_get))
        .route("/v1/grants/{id}/revoke", post(grant_revoke))
        .route("/v1/steady-state", post(steady_state))
        .route("/v1/ops", post(op_create).get(op_list))
        .route("/v1/ops/{id}", get(op_get))
        .route("/v1/customers/{customer}/webhook", post(webhook_set))
        .route("/v1/webhook-deliveries", get(webhook_status))
        .route("/v1/approvals", get(approval_list))
        .route("/v1/approvals/{id}", get(approval_show))
        .route("/v1/approvals/{id}/statement", get(approval_statement))
        .route("/v1/approvals/{id}/approve", post(approval_approve))
        .route("/v1/approvals/{id}/deny", post(approval_deny))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/audit/teardown/{id}", get(audit_teardown))
        .route("/v1/audit/anchor", get(audit_anchor))
        .fallback(|| async {
            Failure(
                ApiError::new(ErrorCode::NotFound, "no such API route")
                    .hint("the CLI and the gateway may be different versions"),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(1024 * 1024))
        .with_state(gw)
}

async fn whoami(State(gw): State<Gw>, caller: Caller) -> ApiResult<Identity> {
    // The token's lifetime is read here rather than carried in every request's Caller.
    let expires_at = gw
        .store
        .get_token(&caller.token_id)
        .await
        .map_err(internal)?
        .and_then(|t| t.expires_at);
    Ok(Json(Identity {
        id: caller.token_id,
        role: caller.role,
        name: caller.name,
        customer: caller.customer,
        expires_at,
    }))
}

fn internal(e: impl std::fmt::Display) -> Failure {
    Failure(ApiError::internal(e.to_string()))
}

fn check_name(what: &str, v: &str) -> Result<(), ApiError> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@+:".contains(c));
    if ok {
        Ok(())
    } else {
        Err(
            ApiError::invalid(format!("{what} {v:?} is not valid")).hint(format!(
                "{what} must be 1–128 characters of letters, digits and - _ . @ + :"
            )),
        )
    }
}

async fn token_create(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<TokenCreateRequest>,
) -> ApiResult<TokenCreated> {
    crate::api_tokens::check_create(&caller, &req)?;
    let ttl = crate::api_tokens::parse_ttl(req.ttl.as_deref())?;
    let (row, token) = crate::api_tokens::mint(
        &gw.store,
        &crate::api_tokens::NewToken {
            role: req.role,
            name: &req.name,
            customer: req.customer.as_deref(),
            created_by: &caller.actor(),
            created_by_id: Some(caller.token_id.as_str()).filter(|id| !id.is_empty()),
            ttl,
        },
        crate::store::now(),
    )
    .await?;
    gw.audit
        .record(
            "token.created",
            &caller.actor(),
            Subject::default(),
            serde_json::json!({
                "token_id": row.id, "role": req.role, "name": req.name, "customer": req.customer,
                "expires_at": row.expires_at,
            }),
        )
        .await;
    Ok(Json(TokenCreated {
        id: row.id,
        token,
        role: req.role,
        name: req.name,
        customer: req.customer,
        expires_at: row.expires_at,
    }))
}

async fn token_list(State(gw): State<Gw>, caller: Caller) -> ApiResult<TokenList> {
    Ok(Json(TokenList {
        tokens: crate::api_tokens::list(&gw.store, &caller).await?,
    }))
}

/// Revokes a token at once (the next request with it is `UNAUTHENTICATED`) and ends the
/// endpoints it made, so its holder keeps no working credential.
async fn token_revoke(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<TokenRecord> {
    let row = crate::api_tokens::revoke(&gw.store, &caller, &id, crate::store::now()).await?;
    gw.audit
        .record(
            "token.revoked",
            &caller.actor(),
            Subject::default(),
            serde_json::json!({"token_id": row.id, "role": row.role, "name": row.name}),
        )
        .await;
    let ended = gw
        .endpoint_service
        .end_all_created_by(&row.id, &caller)
        .await;
    if ended > 0 {
        tracing::info!(token = %row.id, endpoints = ended, "ended the revoked token's endpoints");
    }
    Ok(Json(crate::api_tokens::record(&row)?))
}

async fn appliance_add(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<ApplianceAddRequest>,
) -> ApiResult<ApplianceAdded> {
    caller.require(&[Role::Admin], "register appliances")?;
    check_name("app", &req.app)?;
    check_name("customer", &req.customer)?;
    let ttl = Duration::from_secs(req.token_ttl_s.unwrap_or(3600));
    if ttl < Duration::from_secs(10) || ttl > TTL_MAX {
        return Err(ApiError::invalid(format!(
            "token TTL {} is outside 10s–7d",
            format_duration(ttl)
        ))
        .into());
    }
    if let Some(existing) = gw
        .store
        .find_appliance(&req.app, &req.customer)
        .await
        .map_err(internal)?
    {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "app {} for customer {} is already registered as {}",
                req.app, req.customer, existing.id
            ),
        )
        .hint(format!(
            "revoke it first (`postern appliance revoke {}`) to enroll a replacement",
            existing.id
        ))
        .details(serde_json::json!({"appliance_id": existing.id}))
        .into());
    }
    let now = crate::store::now();
    let appliance_id = format!("ap_{}", identity::random_hex(8));
    gw.store
        .insert_appliance(&ApplianceRow {
            id: appliance_id.clone(),
            app: req.app.clone(),
            customer: req.customer.clone(),
            created_at: now,
            created_by: caller.actor(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        })
        .await
        .map_err(internal)?;
    let secret = identity::random_secret();
    let token_id = identity::random_hex(8);
    let expires_at = now + jiff::SignedDuration::from_secs(ttl.as_secs() as i64);
    gw.store
        .insert_enrollment_token(&EnrollmentRow {
            id: token_id.clone(),
            appliance_id: appliance_id.clone(),
            secret_hash: identity::hash_secret(&secret),
            expires_at,
            used: false,
        })
        .await
        .map_err(internal)?;
    let token = EnrollmentToken {
        id: token_id,
        secret,
        ca: gw.ca_fingerprint.clone(),
    };
    gw.audit
        .record(
            "appliance.added",
            &caller.actor(),
            Subject::appliance(&appliance_id),
            serde_json::json!({
                "app": req.app, "customer": req.customer, "token_expires_at": expires_at,
            }),
        )
        .await;
    Ok(Json(ApplianceAdded {
        appliance_id,
        app: req.app,
        customer: req.customer,
        token: certs::Secret::new(token.encode()),
        expires_at,
        ca_fingerprint: gw.ca_fingerprint.clone(),
    }))
}

fn appliance_record(gw: &ApiState, a: ApplianceRow) -> ApplianceRecord {
    let link = gw.agents.get(&a.id);
    let resources = match &link {
        Some(l) => l.resources.clone(),
        None => serde_json::from_str::<Vec<ResourceDescriptor>>(&a.resources).unwrap_or_default(),
    };
    ApplianceRecord {
        online: link.is_some(),
        last_seen: a.last_seen,
        agent_version: a.agent_version,
        enrolled: a.enrolled_at.is_some(),
        revoked: a.revoked_at.is_some(),
        resources,
        appliance_id: a.id,
        app: a.app,
        customer: a.customer,
        cert_expires_at: None,
    }
}

async fn appliance_list(State(gw): State<Gw>, caller: Caller) -> ApiResult<ApplianceList> {
    let rows = gw.store.list_appliances().await.map_err(internal)?;
    let expiries: std::collections::HashMap<String, jiff::Timestamp> = gw
        .store
        .cert_expiries()
        .await
        .map_err(internal)?
        .into_iter()
        .collect();
    let appliances = rows
        .into_iter()
        .filter(|a| caller.sees_customer(&a.customer))
        .map(|a| {
            let expires = expiries.get(&a.id).copied();
            ApplianceRecord {
                cert_expires_at: expires,
                ..appliance_record(&gw, a)
            }
        })
        .collect();
    Ok(Json(ApplianceList { appliances }))
}

async fn appliance_revoke(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<ApplianceRecord> {
    caller.require(&[Role::Admin, Role::Approver], "revoke appliances")?;
    let not_found = || {
        ApiError::new(ErrorCode::NotFound, format!("no appliance {id}"))
            .hint("`postern appliance list` shows them")
    };
    let a = gw
        .store
        .get_appliance(&id)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    if !caller.sees_customer(&a.customer) {
        return Err(not_found().into());
    }
    if !gw
        .store
        .revoke_appliance(&id, Timestamp::now())
        .await
        .map_err(internal)?
    {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("appliance {id} is already revoked"),
        )
        .into());
    }
    gw.endpoint_service
        .end_all_of(&id, CloseReason::Revoked, &caller)
        .await;
    if let Some(link) = gw.agents.get(&id) {
        link.connection.close(
            crate::relay::close::REVOKED.into(),
            b"APPLIANCE_REVOKED: the appliance was revoked",
        );
    }
    gw.audit
        .record(
            "appliance.revoked",
            &caller.actor(),
            Subject::appliance(&id),
            serde_json::json!({}),
        )
        .await;
    let a = gw
        .store
        .get_appliance(&id)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    let mut rec = appliance_record(&gw, a);
    rec.online = false;
    Ok(Json(rec))
}

async fn endpoint_create(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<EndpointCreateRequest>,
) -> ApiResult<EndpointRecord> {
    Ok(Json(gw.endpoint_service.create(&caller, req).await?))
}

async fn endpoint_list(State(gw): State<Gw>, caller: Caller) -> ApiResult<EndpointList> {
    Ok(Json(EndpointList {
        endpoints: gw.endpoint_service.list(&caller).await?,
    }))
}

async fn endpoint_get(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<EndpointRecord> {
    Ok(Json(gw.endpoint_service.get(&caller, &id).await?))
}

async fn endpoint_retire(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<EndpointRecord> {
    Ok(Json(gw.endpoint_service.retire(&caller, &id).await?))
}

async fn grant_request(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<GrantRequest>,
) -> ApiResult<GrantRecord> {
    Ok(Json(gw.grants.request(&caller, req).await?))
}

async fn grant_list(State(gw): State<Gw>, caller: Caller) -> ApiResult<serde_json::Value> {
    Ok(Json(
        serde_json::json!({ "grants": gw.grants.list(&caller).await? }),
    ))
}

async fn grant_get(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<GrantRecord> {
    Ok(Json(gw.grants.get(&caller, &id).await?))
}

async fn grant_revoke(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<GrantRecord> {
    Ok(Json(gw.grants.revoke(&caller, &id).await?))
}

/// The customer's kill switch (`crate::grants::bulk`).
async fn grant_revoke_customer(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<crate::grants::BulkRevokeRequest>,
) -> ApiResult<crate::grants::BulkRevoked> {
    Ok(Json(gw.grants.revoke_customer(&caller, req).await?))
}

#[derive(Debug, Deserialize)]
struct SteadyState {
    app: String,
    customer: String,
    enabled: bool,
}

/// Steady-state (read-only observability) is on by default; it is the customer's to turn off.
async fn steady_state(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<SteadyState>,
) -> ApiResult<serde_json::Value> {
    caller.require(
        &[Role::Approver],
        "change steady-state access (a customer decision)",
    )?;
    caller.require_customer(&req.customer)?;
    let found = gw.store.find_appliance(&req.app, &req.customer).await;
    let a = crate::lookup::registered(found, &req.app, &req.customer)?;
    gw.store
        .set_steady_state(&a.id, req.enabled)
        .await
        .map_err(internal)?;
    let kind = if req.enabled {
        "steady_state.enabled"
    } else {
        "steady_state.disabled"
    };
    gw.audit
        .record(
            kind,
            &caller.actor(),
            Subject::appliance(&a.id),
            serde_json::json!({}),
        )
        .await;
    // The agent starts or stops collecting (an acknowledged command; one not connected is told
    // after its next hello).
    gw.agents.send(
        &a.id,
        endpoint_types::frame::ToAgent::SteadyState {
            enabled: req.enabled,
        },
    );
    Ok(Json(
        serde_json::json!({"appliance_id": a.id, "app": a.app, "customer": a.customer, "steady_state": req.enabled}),
    ))
}

/// The latest steady-state snapshot per resource (`postern appliance status`).
async fn appliance_status(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<crate::steady_state_snapshots::StatusReport> {
    let not_found = || {
        ApiError::new(ErrorCode::NotFound, format!("no appliance {id}"))
            .hint("`postern appliance list` shows them")
    };
    let a = gw
        .store
        .get_appliance(&id)
        .await
        .map_err(internal)?
        .ok_or_else(not_found)?;
    if !caller.sees_customer(&a.customer) {
        return Err(not_found().into());
    }
    if !gw.grants.steady_state_enabled(&a.id).await {
        return Err(crate::steady_state_snapshots::disabled(&a.app, &a.customer).into());
    }
    let rows = gw.store.latest_snapshots(&a.id).await.map_err(internal)?;
    Ok(Json(crate::steady_state_snapshots::report(
        &a.id,
        &a.app,
        &a.customer,
        rows,
        Timestamp::now(),
    )))
}

async fn op_create(
    State(gw): State<Gw>,
    caller: Caller,
    Body(req): Body<OpRequest>,
) -> ApiResult<OpRecord> {
    Ok(Json(gw.ops.create(&caller, req).await?))
}

async fn op_get(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<OpRecord> {
    Ok(Json(gw.ops.get(&caller, &id).await?))
}

/// `?state=&app=&customer=&mine=true` narrow the list (crate::ops::list_filter).
async fn op_list(
    State(gw): State<Gw>,
    caller: Caller,
    Params(q): Params<std::collections::HashMap<String, String>>,
) -> ApiResult<serde_json::Value> {
    let filter = crate::ops::list_filter::OpFilter::from_query(&caller, &q)?;
    let mut ops: Vec<OpRecord> = gw.ops.list(&caller).await?;
    ops.retain(|op| filter.keeps(&caller, op));
    Ok(Json(serde_json::json!({ "ops": ops })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookSet {
    url: Option<String>,
    /// PEM bundle the receiver's chain must end in (default: the system roots).
    #[serde(default)]
    ca_pem: Option<String>,
    /// Loopback, link-local, private and CGNAT targets (admin only).
    #[serde(default)]
    allow_private: bool,
}

/// Where the customer's approvers hear about requests waiting for them: https only, signed
/// with a secret returned here once.
async fn webhook_set(
    State(gw): State<Gw>,
    caller: Caller,
    Path(customer): Path<String>,
    Body(req): Body<WebhookSet>,
) -> ApiResult<serde_json::Value> {
    caller.require(
        &[Role::Admin, Role::Approver],
        "set a customer's approval webhook",
    )?;
    caller.require_customer(&customer)?;
    if req.allow_private {
        caller.require(&[Role::Admin], "allow a webhook to reach private addresses")?;
    }
    let ca = if req.ca_pem.is_some() {
        "custom"
    } else {
        "system"
    };
    let (secret, superseded) = match &req.url {
        Some(url) => {
            let set = crate::webhooks::SetRequest {
                url: url.clone(),
                ca_pem: req.ca_pem.clone(),
                allow_private: req.allow_private,
            };
            let out = gw.webhooks.set(&customer, set).await?;
            (Some(out.secret), out.superseded)
        }
        None => (None, gw.webhooks.clear(&customer).await?),
    };
    gw.audit
        .record(
            "webhook.set",
            &caller.actor(),
            Subject::default(),
            serde_json::json!({"customer": customer, "url": req.url,
                "allow_private": req.allow_private, "ca": ca}),
        )
        .await;
    let mut v = serde_json::json!({
        "customer": customer, "webhook_url": req.url, "allow_private": req.allow_private,
        "ca": ca, "superseded_deliveries": superseded,
    });
    if let Some(secret) = secret {
        v["secret"] = secret.expose().into();
        v["hint"] = "store the secret now, it is not shown again; receivers check the \
                     Postern-Signature header with it (README: Signed webhooks)"
            .into();
    }
    Ok(Json(v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookStatusQuery {
    customer: Option<String>,
}

/// The webhook's deliveries, newest first (an approver sees their own customer's).
async fn webhook_status(
    State(gw): State<Gw>,
    caller: Caller,
    Params(q): Params<WebhookStatusQuery>,
) -> ApiResult<serde_json::Value> {
    caller.require(&[Role::Admin, Role::Approver], "see webhook deliveries")?;
    let customer = q
        .customer
        .or_else(|| caller.customer_scope().map(str::to_string));
    if let Some(c) = &customer {
        caller.require_customer(c)?;
    }
    let mut v = serde_json::json!({
        "deliveries": gw.webhooks.deliveries(customer.as_deref()).await?
            .iter().map(crate::webhooks::delivery_json).collect::<Vec<_>>(),
    });
    if let Some(c) = &customer {
        let settings = gw.webhooks.settings(c).await?;
        v["customer"] = c.as_str().into();
        v["webhook_url"] = settings.as_ref().map(|s| s.url.clone()).into();
        v["allow_private"] = settings.as_ref().is_some_and(|s| s.allow_private).into();
    }
    Ok(Json(v))
}

async fn approval_list(State(gw): State<Gw>, caller: Caller) -> ApiResult<serde_json::Value> {
    Ok(Json(
        serde_json::json!({ "approvals": gw.approvals.list(&caller).await? }),
    ))
}

async fn approval_show(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    Ok(Json(gw.approvals.show(&caller, &id).await?))
}

async fn approval_statement(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    Ok(Json(gw.approvals.statement(&caller, &id).await?))
}

/// The body is optional (an unsigned approval without a message may send none).
async fn approval_approve(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<serde_json::Value> {
    let d: Decision = if body.iter().all(u8::is_ascii_whitespace) {
        Decision::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::invalid(format!("bad request body: {e}")))?
    };
    Ok(Json(
        gw.approvals
            .decide(&caller, &id, true, d.message, d.signed)
            .await?,
    ))
}

async fn approval_deny(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
    Body(d): Body<Decision>,
) -> ApiResult<serde_json::Value> {
    Ok(Json(
        gw.approvals
            .decide(&caller, &id, false, d.message, d.signed)
            .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    appliance: Option<String>,
    since: Option<Timestamp>,
    after_seq: Option<i64>,
    limit: Option<u32>,
}

async fn audit_list(
    State(gw): State<Gw>,
    caller: Caller,
    Params(q): Params<AuditQuery>,
) -> ApiResult<AuditList> {
    let limit = q.limit.unwrap_or(AUDIT_PAGE_DEFAULT);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return Err(
            ApiError::invalid(format!("limit {limit} is outside 1–{AUDIT_PAGE_MAX}"))
                .hint(format!(
                    "ask for at most {AUDIT_PAGE_MAX} records a page and follow next_after_seq"
                ))
                .into(),
        );
    }
    let appliances_in = if caller.customer_scope().is_some() {
        // A token bound to a customer sees the records about that customer's appliances.
        Some(
            gw.store
                .list_appliances()
                .await
                .map_err(internal)?
                .into_iter()
                .filter(|a| caller.sees_customer(&a.customer))
                .map(|a| a.id)
                .collect(),
        )
    } else {
        None
    };
    let page = gw
        .store
        .audit_page(&AuditPageQuery {
            after_seq: q.after_seq.unwrap_or(0).max(0),
            limit,
            since: q.since,
            appliance: q.appliance,
            appliances_in,
        })
        .await
        .map_err(internal)?;
    Ok(Json(AuditList {
        records: page.records,
        next_after_seq: page.next_after_seq,
    }))
}

async fn audit_verify(State(gw): State<Gw>, caller: Caller) -> ApiResult<AuditVerified> {
    caller.require(&[Role::Admin], "verify the vendor audit trail")?;
    // Chain, signed heads, agents' anchors, and the head kept outside the store.
    match gw
        .audit_heads
        .verify(&gw.audit, vec![])
        .await
        .map_err(internal)?
    {
        Ok(v) => Ok(Json(v)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, Deserialize)]
struct AnchorQuery {
    appliance: String,
}

/// The latest head of an appliance's customer trail that this gateway anchored: the customer
/// checks their trail against it (`postern-agent audit verify --anchor FILE`). The head is
/// signed by the appliance itself, so the gateway can withhold it but not forge it.
async fn audit_anchor(
    State(gw): State<Gw>,
    caller: Caller,
    Params(q): Params<AnchorQuery>,
) -> ApiResult<serde_json::Value> {
    caller.require(
        &[Role::Admin, Role::Approver],
        "read an appliance's anchored trail head",
    )?;
    let appliance = gw
        .store
        .get_appliance(&q.appliance)
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("no appliance {}", q.appliance))
        })?;
    caller.require_customer(&appliance.customer)?;
    match crate::audit_heads::latest_anchor(&gw.audit, &appliance.id)
        .await
        .map_err(internal)?
    {
        Some((seq, anchor)) => Ok(Json(serde_json::json!({
            "appliance_id": appliance.id,
            "vendor_seq": seq,
            "anchor": anchor.head,
        }))),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!("the gateway holds no signed head of appliance {}'s trail yet", appliance.id),
        )
        .hint("the agent sends its head at least every 100 records or minute of activity, and on every connect")
        .into()),
    }
}

/// The stored teardown proof of an endpoint, unverified: the caller checks it against the
/// gateway CA (`postern audit teardown`). A customer sees its own appliances' only.
async fn audit_teardown(
    State(gw): State<Gw>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<endpoint_types::teardown::TeardownRecord> {
    if caller.role == Role::Approver {
        let visible = match gw.store.get_endpoint(&id).await.map_err(internal)? {
            Some(ep) => gw
                .store
                .get_appliance(&ep.appliance_id)
                .await
                .map_err(internal)?
                .is_some_and(|a| caller.sees_customer(&a.customer)),
            None => false,
        };
        if !visible {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no teardown record for endpoint {id}"),
            )
            .into());
        }
    }
    Ok(Json(crate::teardown_proofs::get(&gw.store, &id).await?))
}

/// Serves the API over TLS until shutdown; each connection drains gracefully.
pub async fn serve(gw: Gw, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(gw.clone());
    while let Some((tcp, remote, permit)) =
        crate::admission::accept_admitted(&gw.door, &gw.shutdown, &listener).await
    {
        let (acceptor, app, gw2) = (acceptor.clone(), app.clone(), gw.clone());
        gw.tasks.spawn(async move {
            let tls = match tokio::time::timeout(gw2.handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => return tracing::debug!(%remote, error = %e, "API TLS handshake failed"),
                Err(_) => return tracing::debug!(%remote, "API TLS handshake timed out"),
            };
            // Requests carry their token; the handshake was the unauthenticated part.
            drop(permit);
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tls), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(%remote, error = %e, "API connection ended") },
                _ = gw2.shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(3), conn).await;
                }
            }
        });
    }
}
