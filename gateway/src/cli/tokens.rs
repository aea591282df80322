//! `postern token …` (API tokens for people and scripts) and `postern admin recover` (a new
//! admin token written on the gateway host, straight to the store).

use super::{client::ApiClient, print_json, OutputFormat};
use clap::Subcommand;
use endpoint_types::{api::*, ApiError};

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint an API token (shown once). Admins only.
    Create {
        /// What the token may do: admin (everything), operator (grants, ops, endpoints),
        /// approver (a customer's decisions).
        #[arg(long, value_parser = ["admin", "operator", "approver"])]
        role: String,
        /// Unique among live tokens; recorded as the actor in the audit trail.
        #[arg(long)]
        name: String,
        /// The customer the token acts for (required for approvers; binds an operator to
        /// that customer's appliances).
        #[arg(long)]
        customer: Option<String>,
        /// Lifetime (90d, 12h, …) or `never`. Default 90d.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Tokens: every token for an admin, your own otherwise. Never the secrets.
    List,
    /// Revoke a token now: its next request is refused, the endpoints it made are ended.
    Revoke {
        /// The token's id (`postern token list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// On the gateway host: mint a new admin token straight in the store and write it to the
    /// data dir's admin.token (which must be missing). Recorded in the audit trail.
    Recover {
        #[command(flatten)]
        location: super::store_location::StoreLocation,
        /// Lifetime of the new token (or `never`, the default: it replaces the bootstrap one).
        #[arg(long, default_value = "never")]
        ttl: String,
    },
}

fn when(t: Option<jiff::Timestamp>, none: &str) -> String {
    t.map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| none.to_string())
}

pub async fn token(cmd: TokenCmd, c: &ApiClient, out: OutputFormat) -> Result<(), ApiError> {
    match cmd {
        TokenCmd::Create {
            role,
            name,
            customer,
            ttl,
        } => {
            let body =
                serde_json::json!({"role": role, "name": name, "customer": customer, "ttl": ttl});
            let t: TokenCreated = c.post("/v1/tokens", body).await?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "id": t.id, "token": t.token.expose(), "role": t.role, "name": t.name, "customer": t.customer,
                    "expires_at": t.expires_at,
                })),
                OutputFormat::Text => {
                    eprintln!(
                        "token {} for {} ({}), expires {}; it is shown only now:",
                        t.id,
                        t.name,
                        t.role.as_str(),
                        when(t.expires_at, "never")
                    );
                    println!("{}", t.token.expose());
                }
            }
        }
        TokenCmd::List => {
            let l: TokenList = c.get("/v1/tokens").await?;
            match out {
                OutputFormat::Json => print_json(&l),
                OutputFormat::Text => {
                    println!(
                        "{:<18} {:<9} {:<28} {:<14} {:<21} {:<21} LAST USED",
                        "ID", "ROLE", "NAME", "CUSTOMER", "CREATED", "EXPIRES"
                    );
                    for t in l.tokens {
                        let expires = match t.revoked_at {
                            Some(at) => format!("revoked {}", when(Some(at), "")),
                            None => when(t.expires_at, "never"),
                        };
                        println!(
                            "{:<18} {:<9} {:<28} {:<14} {:<21} {:<21} {}",
                            t.id,
                            t.role.as_str(),
                            t.name,
                            t.customer.as_deref().unwrap_or("-"),
                            when(Some(t.created_at), ""),
                            expires,
                            when(t.last_used_at, "-")
                        );
                    }
                }
            }
        }
        TokenCmd::Revoke { id } => {
            let t: TokenRecord = c
                .post(&format!("/v1/tokens/{id}/revoke"), serde_json::json!({}))
                .await?;
            match out {
                OutputFormat::Json => print_json(&t),
                OutputFormat::Text => println!("token {} ({}) revoked", t.id, t.name),
            }
        }
    }
    Ok(())
}

pub async fn admin(cmd: AdminCmd, out: OutputFormat) -> Result<(), ApiError> {
    let AdminCmd::Recover { location, ttl } = cmd;
    let crate::config::GatewayConfig {
        data_dir, store, ..
    } = location.gateway_config()?;
    let ttl = crate::api_tokens::parse_ttl(Some(&ttl))?;
    let file = crate::server::DataDir(data_dir.clone()).admin_token();
    if file.exists() {
        return Err(ApiError::new(
            endpoint_types::ErrorCode::Conflict,
            format!(
                "{} exists; recovery writes a new admin token only where there is none",
                file.display()
            ),
        )
        .hint("if the token in it no longer works, move the file away and run this again"));
    }
    let fail = |e: anyhow::Error| {
        ApiError::internal(format!("{e:#}"))
            .hint("run it on the gateway host as the user the gateway runs as")
    };
    let store = match &store {
        Some(url) => crate::store::Store::open(url).await.map_err(|e| {
            ApiError::invalid(format!(
                "opening store {}: {e}",
                crate::store::redact_url(url)
            ))
        })?,
        None => {
            let db = crate::server::DataDir(data_dir.clone()).database();
            if !db.exists() {
                return Err(ApiError::invalid(format!(
                    "{} holds no gateway store ({} is missing)",
                    data_dir.display(),
                    db.display()
                ))
                .hint("give the --data-dir of `postern server`, and --store URL if it uses one"));
            }
            crate::store::Store::open_sqlite(&db)
                .await
                .map_err(|e| ApiError::invalid(format!("opening store {}: {e}", db.display())))?
        }
    };
    let r = crate::admin_recovery::recover(&store, &data_dir, ttl)
        .await
        .map_err(fail)?;
    store.close().await;
    match out {
        OutputFormat::Json => print_json(&r),
        OutputFormat::Text => println!(
            "new admin token {} ({}) written to {}",
            r.token_id,
            r.name,
            r.admin_token_file.display()
        ),
    }
    Ok(())
}
