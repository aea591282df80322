//! The API's extractors for what a caller sends (a JSON body, query parameters): a rejection
//! is a structured `INVALID_REQUEST`, never axum's plain-text answer.

use crate::api::Failure;
use axum::{
    extract::{FromRequest, FromRequestParts, Query, Request},
    Json,
};
use endpoint_types::ApiError;

/// A JSON body whose rejection is a structured `INVALID_REQUEST`.
pub struct Body<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(Failure(ApiError::invalid(format!(
                "bad request body: {}",
                e.body_text()
            )))),
        }
    }
}

/// Query parameters whose rejection (bad percent-encoding, a number that is not one, an
/// unknown value) is a structured `INVALID_REQUEST`, like a bad body's.
pub struct Params<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Params<T> {
    type Rejection = Failure;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Params(v)),
            Err(e) => Err(Failure(
                ApiError::invalid(format!("bad query parameters: {}", e.body_text())).hint(
                    "check the command's flags (`postern … --help`); values are percent-encoded",
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_types::ErrorCode;

    #[derive(Debug, serde::Deserialize)]
    struct Page {
        #[allow(dead_code)]
        limit: Option<u32>,
    }

    async fn params(uri: &str) -> Result<Params<Page>, Failure> {
        let (mut parts, ()) = axum::http::Request::builder()
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts();
        Params::<Page>::from_request_parts(&mut parts, &()).await
    }

    #[tokio::test]
    async fn bad_query_parameters_are_a_structured_invalid_request() {
        assert!(params("/v1/audit?limit=10").await.is_ok());
        for bad in [
            "/v1/audit?limit=ten",
            "/v1/audit?limit=%ZZ",
            "/v1/audit?limit=-1",
        ] {
            let Err(Failure(e)) = params(bad).await else {
                panic!("{bad} was taken");
            };
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}");
            assert!(
                e.message.starts_with("bad query parameters"),
                "{}",
                e.message
            );
            assert!(!e.hint.is_empty());
        }
    }
}
