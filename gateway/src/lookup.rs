//! Looking up what a request names, alike in every service: a record by id, and its appliance
//! only for callers who see the appliance's customer (to anyone else the record does not exist:
//! NOT_FOUND, learning nothing about it); an appliance by app and customer.

use crate::{
    identity::Caller,
    store::{ApplianceRow, StoreError},
};
use endpoint_types::{ApiError, ErrorCode};

/// The record a store lookup found, or `not_found()`.
pub fn found<R>(
    looked_up: Result<Option<R>, StoreError>,
    not_found: impl Fn() -> ApiError,
) -> Result<R, ApiError> {
    looked_up
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(not_found)
}

/// The record's appliance, if `caller` sees its customer; `not_found()` otherwise.
pub fn seen_by(
    caller: &Caller,
    appliance: Result<Option<ApplianceRow>, StoreError>,
    not_found: impl Fn() -> ApiError,
) -> Result<ApplianceRow, ApiError> {
    let appliance = found(appliance, &not_found)?;
    if !caller.sees_customer(&appliance.customer) {
        return Err(not_found());
    }
    Ok(appliance)
}

/// The appliance registered for `app` and `customer`, or NOT_FOUND with a hint.
pub fn registered(
    looked_up: Result<Option<ApplianceRow>, StoreError>,
    app: &str,
    customer: &str,
) -> Result<ApplianceRow, ApiError> {
    found(looked_up, || {
        ApiError::new(
            ErrorCode::NotFound,
            format!("no appliance for app {app} and customer {customer}"),
        )
        .hint("`postern appliance list` shows the registered appliances")
    })
}
