//! The rules of API tokens for people and scripts: who may mint what, for how long, under which
//! names; when a token stops working; how often its last use is written. The rules are pure
//! functions of their inputs and `now`; the few store calls are in `mint`, `list` and `revoke`.

use crate::{
    identity::{hash_secret, random_hex, random_secret, Caller},
    store::{Store, TokenRevocation, TokenRow},
};
use endpoint_types::{
    api::{Role, TokenCreateRequest, TokenRecord},
    duration::{format_duration, parse_duration},
    secret::Secret,
    token::ApiToken,
    ApiError, ErrorCode,
};
use jiff::{SignedDuration, Timestamp};
use std::{collections::HashMap, sync::Mutex, time::Duration};

/// A token's lifetime when `--ttl` is not given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(90 * 86_400);
/// The longest finite lifetime; beyond it, say `never` (and mean it).
pub const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);
/// A token's last use is written at most this often (not on every request).
pub const LAST_USE_EVERY: Duration = Duration::from_secs(60);

/// Name prefixes the gateway itself records as actors; a person's token may not look like one.
const RESERVED_PREFIXES: [&str; 4] = ["policy:", "system:", "agent:", "postern:"];

/// When a new token stops working: `None` is never.
pub fn parse_ttl(ttl: Option<&str>) -> Result<Option<Duration>, ApiError> {
    let Some(ttl) = ttl.map(str::trim) else {
        return Ok(Some(DEFAULT_TTL));
    };
    if ttl.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    let d = parse_duration(ttl).map_err(|e| {
        ApiError::invalid(format!("--ttl: {e}"))
            .hint("give a lifetime like 2h, 30d or 90d, or `never` (admins only)")
    })?;
    if d < Duration::from_secs(1) || d > MAX_TTL {
        return Err(ApiError::invalid(format!(
            "token lifetime {} is outside 1s–3650d",
            format_duration(d)
        ))
        .hint("use e.g. --ttl 90d; a token that must never expire takes --ttl never"));
    }
    Ok(Some(d))
}

/// A token name: the characters every name in Postern may have, and not a system actor's.
pub fn validate_name(name: &str) -> Result<(), ApiError> {
    let charset = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@+:".contains(c));
    if !charset {
        return Err(ApiError::invalid(format!("token name {name:?} is not valid"))
            .hint("a name is 1–128 characters of letters, digits and - _ . @ + :, e.g. alice@vendor.example"));
    }
    let lower = name.to_ascii_lowercase();
    if let Some(p) = RESERVED_PREFIXES.iter().find(|p| lower.starts_with(*p)) {
        return Err(ApiError::invalid(format!(
            "token name {name:?} looks like a system actor ({p}…) in the audit trail"
        ))
        .hint("name the person or script, e.g. alice@vendor.example or ci-deploy")
        .details(serde_json::json!({"reserved_prefixes": RESERVED_PREFIXES})));
    }
    Ok(())
}

/// Who may mint what: only admins mint tokens, of every role, with any lifetime (`never`
/// included); an admin token is vendor-wide (no customer); an approver acts for one customer;
/// an operator may be bound to one.
pub fn check_create(caller: &Caller, req: &TokenCreateRequest) -> Result<(), ApiError> {
    caller.require(&[Role::Admin], "create tokens")?;
    validate_name(&req.name)?;
    if let Some(c) = &req.customer {
        let ok = !c.is_empty()
            && c.len() <= 128
            && c.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.@+:".contains(ch));
        if !ok {
            return Err(ApiError::invalid(format!("customer {c:?} is not valid"))
                .hint("customer must be 1–128 characters of letters, digits and - _ . @ + :"));
        }
    }
    match (req.role, &req.customer) {
        (Role::Approver, None) => Err(ApiError::invalid("an approver token needs a customer")
            .hint("add --customer C")),
        (Role::Admin, Some(_)) => Err(ApiError::invalid(
            "an admin token is vendor-wide and takes no customer",
        )
        .hint("for someone who works on one customer's appliances only, mint --role operator --customer C")),
        _ => Ok(()),
    }
}

/// Whether a stored token may still be used at `now`: revoked and expired tokens are
/// `UNAUTHENTICATED`, with the command that gets a working one.
pub fn check_usable(row: &TokenRow, now: Timestamp) -> Result<(), ApiError> {
    if let Some(at) = row.revoked_at {
        return Err(ApiError::new(
            ErrorCode::Unauthenticated,
            format!("API token {} ({}) was revoked at {at}", row.id, row.name),
        )
        .hint(format!(
            "ask an admin for a new token: `postern token create --role {} --name {}`",
            row.role, row.name
        ))
        .details(serde_json::json!({"token_id": row.id, "revoked_at": at})));
    }
    match row.expires_at {
        Some(at) if at <= now => Err(ApiError::new(
            ErrorCode::Unauthenticated,
            format!("API token {} ({}) expired at {at}", row.id, row.name),
        )
        .hint(format!(
            "ask an admin for a new token: `postern token revoke {}` frees the name, then `postern token create --role {} --name {}`",
            row.id, row.role, row.name
        ))
        .details(serde_json::json!({"token_id": row.id, "expired_at": at}))),
        _ => Ok(()),
    }
}

/// What `token list` shows of a token (never its secret or hash).
pub fn record(row: &TokenRow) -> Result<TokenRecord, ApiError> {
    Ok(TokenRecord {
        id: row.id.clone(),
        role: Role::parse(&row.role)
            .ok_or_else(|| ApiError::internal(format!("token {} has unknown role", row.id)))?,
        name: row.name.clone(),
        customer: row.customer.clone(),
        created_at: row.created_at,
        expires_at: row.expires_at,
        last_used_at: row.last_used_at,
        revoked_at: row.revoked_at,
        created_by: row.created_by.clone(),
    })
}

/// What a new token is.
#[derive(Debug, Clone)]
pub struct NewToken<'a> {
    pub role: Role,
    pub name: &'a str,
    pub customer: Option<&'a str>,
    pub created_by: &'a str,
    pub created_by_id: Option<&'a str>,
    /// None: never expires.
    pub ttl: Option<Duration>,
}

fn name_taken(name: &str, holder: Option<&TokenRow>) -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::Conflict,
        format!("a live token is already named {name:?}"),
    )
    .hint("token names are unique: pick another, or revoke the old token first (`postern token list` shows it)");
    if let Some(h) = holder {
        e = e.details(serde_json::json!({"token_id": h.id}));
    }
    e
}

/// Mints a token, stores its hash and returns the clear form (shown once). A name a live
/// token holds is `CONFLICT`, decided by the store's unique index (two admins minting the same
/// name at once get one token between them).
pub async fn mint(
    store: &Store,
    t: &NewToken<'_>,
    now: Timestamp,
) -> Result<(TokenRow, Secret), ApiError> {
    let internal = |e: crate::store::StoreError| ApiError::internal(e.to_string());
    if let Some(holder) = store.live_token_named(t.name).await.map_err(internal)? {
        return Err(name_taken(t.name, Some(&holder)));
    }
    let expires_at = match t.ttl {
        None => None,
        Some(d) => Some(
            SignedDuration::try_from(d)
                .ok()
                .and_then(|d| now.checked_add(d).ok())
                .ok_or_else(|| ApiError::invalid("token lifetime too large"))?,
        ),
    };
    let id = random_hex(8);
    let secret = random_secret();
    let row = TokenRow {
        id: id.clone(),
        name: t.name.to_string(),
        role: t.role.as_str().to_string(),
        customer: t.customer.map(str::to_string),
        secret_hash: hash_secret(&secret),
        created_at: now,
        created_by: t.created_by.to_string(),
        created_by_id: t.created_by_id.map(str::to_string),
        expires_at,
        revoked_at: None,
        last_used_at: None,
    };
    if !store.insert_token(&row).await.map_err(internal)? {
        return Err(name_taken(t.name, None));
    }
    Ok((row, Secret::new(ApiToken::format(&id, secret.expose()))))
}

/// The tokens `caller` may see: an admin sees every token, anyone else their own.
pub async fn list(store: &Store, caller: &Caller) -> Result<Vec<TokenRecord>, ApiError> {
    let rows = store
        .list_tokens()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    rows.iter()
        .filter(|r| caller.role == Role::Admin || r.id == caller.token_id)
        .map(record)
        .collect()
}

/// Revokes token `id`: an admin any token, anyone else only their own (a leaked token can be
/// killed by its holder). The last usable admin token cannot be revoked.
pub async fn revoke(
    store: &Store,
    caller: &Caller,
    id: &str,
    now: Timestamp,
) -> Result<TokenRow, ApiError> {
    let not_found = || {
        ApiError::new(ErrorCode::NotFound, format!("no API token {id}"))
            .hint("`postern token list` shows the tokens (their ids, never their secrets)")
    };
    if caller.role != Role::Admin && caller.token_id != id {
        // Not even whether it exists: only admins see other people's tokens.
        return Err(not_found());
    }
    match store
        .revoke_token(id, now)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        TokenRevocation::Revoked(row) => Ok(*row),
        TokenRevocation::NotFound => Err(not_found()),
        TokenRevocation::AlreadyRevoked(at) => Err(ApiError::new(
            ErrorCode::Conflict,
            format!("API token {id} was already revoked at {at}"),
        )
        .details(serde_json::json!({"revoked_at": at}))),
        TokenRevocation::LastAdmin => Err(ApiError::new(
            ErrorCode::Conflict,
            format!("API token {id} is the last usable admin token"),
        )
        .hint("mint another admin first (`postern token create --role admin --name …`), then revoke this one")),
    }
}

/// When each token's last use was last written, so that a busy token costs one store write a
/// minute, not one a request.
#[derive(Debug, Default)]
pub struct LastUse {
    written: Mutex<HashMap<String, Timestamp>>,
}

impl LastUse {
    /// Whether `token_id`'s use at `now` should be written; if so, it counts as written.
    pub fn due(&self, token_id: &str, now: Timestamp) -> bool {
        let Ok(mut written) = self.written.lock() else {
            return true;
        };
        let every = SignedDuration::try_from(LAST_USE_EVERY).unwrap_or(SignedDuration::MAX);
        match written.get(token_id) {
            Some(at) if now.duration_since(*at) < every => false,
            _ => {
                written.insert(token_id.to_string(), now);
                true
            }
        }
    }

    /// Notes a use, writing it when due; a failed write is logged, never the request's failure.
    pub async fn note(&self, store: &Store, token_id: &str, now: Timestamp) {
        if token_id.is_empty() || !self.due(token_id, now) {
            return;
        }
        if let Err(e) = store.touch_token(token_id, now).await {
            tracing::warn!(token = %token_id, error = %e, "could not note the API token's last use");
        }
    }
}

#[cfg(test)]
mod tests;
