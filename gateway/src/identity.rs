//! Who is calling: API tokens (minted, stored hashed, checked in constant time) and the rules
//! of what each role may do.

use crate::store::{Store, StoreError, TokenRow};
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

    /// Approvers act only within their own customer.
    pub fn require_customer(&self, customer: &str) -> Result<(), ApiError> {
        match (&self.role, &self.customer) {
            (Role::Approver, Some(c)) if c != customer => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "{} is an approver for customer {c}, not {customer}",
                    self.name
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn sees_customer(&self, customer: &str) -> bool {
        self.require_customer(customer).is_ok()
    }

    /// The one customer this caller sees, if bound to one (so lists can filter in the store).
    pub fn customer_scope(&self) -> Option<&str> {
        match (&self.role, &self.customer) {
            (Role::Approver, Some(c)) => Some(c),
            _ => None,
        }
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

/// Mints a token, stores its hash and returns the clear form (shown once).
pub async fn mint_token(
    store: &Store,
    role: Role,
    name: &str,
    customer: Option<&str>,
    created_by: &str,
    now: Timestamp,
) -> Result<(TokenRow, Secret), StoreError> {
    let id = random_hex(8);
    let secret = random_secret();
    let row = TokenRow {
        id: id.clone(),
        name: name.to_string(),
        role: role.as_str().to_string(),
        customer: customer.map(str::to_string),
        secret_hash: hash_secret(&secret),
        created_at: now,
        created_by: created_by.to_string(),
        revoked: false,
    };
    store.insert_token(&row).await?;
    Ok((row, Secret::new(ApiToken::format(&id, secret.expose()))))
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message.to_string())
        .hint("set POSTERN_TOKEN (or --token) to a token from `postern token create`, or the admin token file of `postern server`")
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
    if row.revoked {
        return Err(unauthenticated("the API token has been revoked"));
    }
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
    fn only_a_bound_approver_has_a_customer_scope_and_it_agrees_with_sees_customer() {
        let caller = |role, customer: Option<&str>| Caller {
            token_id: "tok".into(),
            name: "x".into(),
            role,
            customer: customer.map(Into::into),
        };
        let bound = caller(Role::Approver, Some("acme"));
        assert_eq!(bound.customer_scope(), Some("acme"));
        assert!(bound.sees_customer("acme") && !bound.sees_customer("globex"));
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
        let (row, token) = mint_token(
            &store,
            Role::Operator,
            "alice@vendor.example",
            None,
            "admin",
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
