//! The filters of `GET /v1/ops` (`postern ops list`): `state`, `app` with `customer`,
//! `customer`, and `mine` (ops the caller's own token requested). They narrow what the caller
//! may see anyway (a token minted for a customer sees only that customer's ops); a filter on
//! another customer is refused rather than answered with an empty list.

use crate::identity::Caller;
use endpoint_types::{
    control::{OpRecord, OpState},
    ApiError,
};
use std::collections::HashMap;

const STATES: &str = "pending-approval, approved, running, output-pending-approval, completed, failed, denied, timed-out, expired";

/// A parsed, checked filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpFilter {
    pub state: Option<OpState>,
    pub app: Option<String>,
    pub customer: Option<String>,
    pub mine: bool,
}

impl OpFilter {
    /// From the query terms; an unknown term or value is a structured error naming it.
    pub fn from_query(caller: &Caller, q: &HashMap<String, String>) -> Result<OpFilter, ApiError> {
        if let Some(unknown) = q
            .keys()
            .find(|k| !["state", "app", "customer", "mine"].contains(&k.as_str()))
        {
            return Err(
                ApiError::invalid(format!("unknown query term {unknown:?} for /v1/ops"))
                    .hint("the terms are state, app (with customer), customer and mine"),
            );
        }
        let state = q
            .get("state")
            .map(|s| {
                OpState::parse(s).ok_or_else(|| {
                    ApiError::invalid(format!("unknown op state {s:?}"))
                        .hint(format!("one of {STATES}"))
                })
            })
            .transpose()?;
        let mine = match q.get("mine").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(
                    ApiError::invalid(format!("mine={other:?} is not a boolean"))
                        .hint("mine=true or mine=false"),
                )
            }
        };
        let nonempty = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
        let (app, customer) = (nonempty("app"), nonempty("customer"));
        if app.is_some() && customer.is_none() {
            return Err(ApiError::invalid("app without customer")
                .hint("an app names an appliance only together with its customer: add customer"));
        }
        if let Some(c) = &customer {
            caller.require_customer(c)?;
        }
        Ok(OpFilter {
            state,
            app,
            customer,
            mine,
        })
    }

    /// Whether `op` passes; `caller` decides `mine` by token id, never by display name.
    pub fn keeps(&self, caller: &Caller, op: &OpRecord) -> bool {
        self.state.is_none_or(|s| op.state == s)
            && self.app.as_deref().is_none_or(|a| op.app == a)
            && self.customer.as_deref().is_none_or(|c| op.customer == c)
            && (!self.mine || caller.made(op.requested_by_id.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::api::Role;

    fn caller(customer: Option<&str>) -> Caller {
        Caller {
            token_id: "tok_1".into(),
            name: "op@vendor".into(),
            role: Role::Operator,
            customer: customer.map(str::to_string),
        }
    }

    fn query(terms: &[(&str, &str)]) -> HashMap<String, String> {
        terms
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn bad_terms_are_refused_with_a_hint() {
        let c = caller(None);
        for (terms, says) in [
            (vec![("colour", "red")], "unknown query term"),
            (vec![("state", "runnin")], "unknown op state"),
            (vec![("mine", "yes")], "not a boolean"),
            (vec![("app", "shop")], "app without customer"),
        ] {
            let e = OpFilter::from_query(&c, &query(&terms)).unwrap_err();
            assert_eq!(e.code, endpoint_types::ErrorCode::InvalidRequest);
            assert!(e.message.contains(says), "{e}");
            assert!(!e.hint.is_empty());
        }
    }

    #[test]
    fn a_customer_bound_token_may_not_filter_on_another_customer() {
        let c = caller(Some("acme"));
        let e = OpFilter::from_query(&c, &query(&[("customer", "globex")])).unwrap_err();
        assert_eq!(e.code, endpoint_types::ErrorCode::Forbidden);
        assert!(OpFilter::from_query(&c, &query(&[("customer", "acme")])).is_ok());
    }

    #[test]
    fn all_terms_parse() {
        let f = OpFilter::from_query(
            &caller(None),
            &query(&[
                ("state", "timed-out"),
                ("app", "shop"),
                ("customer", "acme"),
                ("mine", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(
            f,
            OpFilter {
                state: Some(OpState::TimedOut),
                app: Some("shop".into()),
                customer: Some("acme".into()),
                mine: true
            }
        );
    }
}
