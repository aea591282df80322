//! Who is calling: API tokens (minted, stored hashed, checked in constant time) and the rules
//! of what each role may do.

use crate::store::Store;
use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use endpoint_types::{api::Role, secret::Secret, token::ApiToken, ApiError, ErrorCode};
use jiff::Timestamp;
use rand::RngCore;
use subtle::ConstantTimeEq;

/// The caller of one API request; what the audit trail records as the actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
    /// Approvers are bound to one customer.
    pub customer: Option<String>,
}

impl Caller {
    /// The gateway itself (expiry timers, relay events).
    pub fn system() -> Caller {
        Caller {
            token_id: String::new(),
            name: "system:gateway".into(),
            role: Role::Admin,
            customer: None,
        }
    }

    pub fn actor(&self) -> String {
        self.name.clone()
    }

    pub fn require(&self, allowed: &[Role], action: &str) -> Result<(), ApiError> {
        if allowed.contains(&self.role) {
            return Ok(());
        }
        let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("{} ({}) may not {action}", self.name, self.role.as_str()),
        )
        .hint(format!(
            "this needs a token with role {}",
            names.join(" or ")
        )))
    }

    /// A token minted for a customer (every approver, and an operator minted with
    /// `--customer`) acts only within that customer.
    pub fn require_customer(&self, customer: &str) -> Result<(), ApiError> {
        match &self.customer {
            Some(c) if c != customer => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} ({}) acts for customer {c} only, not {customer}",
                    self.name,
                    self.role.as_str()
                ),
            )
            .hint(format!(
                "this token was minted with --customer {c}; use a token of customer {customer} or a vendor-wide one"
            ))),
            _ => Ok(()),
        }
    }

    pub fn sees_customer(&self, customer: &str) -> bool {
        self.require_customer(customer).is_ok()
    }

    /// The one customer this caller sees, if bound to one (so lists can filter in the store).
    pub fn customer_scope(&self) -> Option<&str> {
        self.customer.as_deref()
    }

    /// Whether this caller is the one who made a record that keeps its maker's token id: by
    /// id, never by the display name (a name can be reused once its token is revoked).
    pub fn made(&self, maker_id: Option<&str>) -> bool {
        !self.token_id.is_empty() && maker_id == Some(self.token_id.as_str())
    }
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

pub fn random_secret() -> Secret {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    Secret::new(URL_SAFE_NO_PAD.encode(b))
}

/// Tokens carry 256 random bits, so one SHA-256 is enough to make the stored form useless to a
/// thief; a slow password hash would buy nothing here.
pub fn hash_secret(secret: &Secret) -> String {
    hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        secret.expose().as_bytes(),
    ))
}

pub fn secret_matches(secret: &Secret, stored_hash: &str) -> bool {
    hash_secret(secret)
        .as_bytes()
        .ct_eq(stored_hash.as_bytes())
        .into()
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message.to_string())
        .hint("set POSTERN_TOKEN (or --token, or pick a --profile) to a token from `postern token create`, or the admin token file of `postern server`")
}

/// Resolves a bearer token to its caller.
pub async fn authenticate(store: &Store, bearer: Option<&str>) -> Result<Caller, ApiError> {
    let raw = bearer.ok_or_else(|| unauthenticated("no API token was presented"))?;
    let token = ApiToken::parse(raw).map_err(|_| unauthenticated("the API token is malformed"))?;
    let row = store
        .get_token(&token.id)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| unauthenticated("the API token is not known to this gateway"))?;
    if !secret_matches(&token.secret, &row.secret_hash) {
        return Err(unauthenticated(
            "the API token is not known to this gateway",
        ));
    }
    crate::api_tokens::check_usable(&row, Timestamp::now())?;
    let role = Role::parse(&row.role)
        .ok_or_else(|| ApiError::internal(format!("token {} has unknown role", row.id)))?;
    Ok(Caller {
        token_id: row.id,
        name: row.name,
        role,
        customer: row.customer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_bound_token_has_a_customer_scope_and_it_agrees_with_sees_customer() {
        let caller = |role, customer: Option<&str>| Caller {
            token_id: "tok".into(),
            name: "x".into(),
            role,
            customer: customer.map(Into::into),
        };
        for bound in [
            caller(Role::Approver, Some("acme")),
            caller(Role::Operator, Some("acme")),
        ] {
            assert_eq!(bound.customer_scope(), Some("acme"));
            assert!(bound.sees_customer("acme") && !bound.sees_customer("globex"));
        }
        for unbound in [
            caller(Role::Admin, None),
            caller(Role::Operator, None),
            caller(Role::Approver, None),
        ] {
            assert_eq!(unbound.customer_scope(), None);
            assert!(unbound.sees_customer("acme") && unbound.sees_customer("globex"));
        }
    }

    #[tokio::test]
    async fn minted_token_authenticates_and_others_do_not() {
        let store = Store::open_memory().await.unwrap();
        let (row, token) = crate::api_tokens::mint(
            &store,
            &crate::api_tokens::NewToken {
                role: Role::Operator,
                name: "alice@vendor.example",
                customer: None,
                created_by: "admin",
                created_by_id: None,
                ttl: Some(crate::api_tokens::DEFAULT_TTL),
            },
            Timestamp::now(),
        )
        .await
        .unwrap();
        assert_ne!(
            row.secret_hash,
            token.expose(),
            "stored form must not be the token"
        );
        assert!(!row.secret_hash.contains(&token.expose()[20..]));
        let c = authenticate(&store, Some(token.expose())).await.unwrap();
        assert_eq!(c.name, "alice@vendor.example");
        assert_eq!(c.role, Role::Operator);

        let mut forged = token.expose().to_string();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        for bad in [None, Some("garbage"), Some(forged.as_str())] {
            assert_eq!(
                authenticate(&store, bad).await.unwrap_err().code,
                ErrorCode::Unauthenticated
            );
        }
    }

    #[test]
    fn approvers_are_bound_to_their_customer() {
        let c = Caller {
            token_id: "x".into(),
            name: "bob".into(),
            role: Role::Approver,
            customer: Some("acme".into()),
        };
        assert!(c.require_customer("acme").is_ok());
        assert_eq!(
            c.require_customer("globex").unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            c.require(&[Role::Admin], "mint tokens").unwrap_err().code,
            ErrorCode::Forbidden
        );
    }
}
