//! The postgres client's files for an endpoint.

use endpoint_types::{
    api::{ClientCredential, EndpointAccess, EndpointRecord},
    secret::Secret,
    ApiError,
};
use std::path::Path;

pub fn prepare() -> Result<(ClientCredential, Secret), ApiError> {
    Err(ApiError::invalid("postgres endpoints are not available in this CLI yet"))
}

pub fn write(_rec: &mut EndpointRecord, _access: &EndpointAccess, _secret: &Secret, _home: &Path) -> Result<(), ApiError> {
    Err(ApiError::invalid("postgres endpoints are not available in this CLI yet"))
}
