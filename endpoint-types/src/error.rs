//! Structured errors every user-facing failure is expressed as: `{code, message, hint, details}`.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable, machine-matchable error codes. Scripts match on these strings. A new code goes into
/// [`ErrorCode::ALL`] too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    ApprovalDenied,
    OperateAccessExpired,
    OperateAccessRequired,
    CommandTimeout,
    CommandFailed,
    EndpointExpired,
    EndpointRetired,
    InvalidOriginResourceId,
    ApplianceOffline,
    ApplianceRevoked,
    TargetUnreachable,
    ForbiddenByScope,
    InvalidRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    Conflict,
    EnrollmentTokenInvalid,
    EnrollmentTokenExpired,
    EnrollmentTokenUsed,
    CaMismatch,
    AuditChainBroken,
    FrameTooLarge,
    MalformedFrame,
    ProtocolVersion,
    SessionLimit,
    GatewayUnreachable,
    DuplicateConnection,
    Internal,
    /// The appliance cannot write its customer trail (full or failing disk).
    AuditUnavailable,
    /// The appliance could not verify an approver's signed decision.
    ApprovalInvalid,
    /// The customer turned steady-state observability off for the appliance.
    SteadyStateDisabled,
    /// The CLI's own `--wait` deadline passed before the op or endpoint it waited for was
    /// decided or ended (the op goes on; never sent by the gateway).
    WaitTimeout,
}

impl ErrorCode {
    /// Every code, in declaration order (for tests and listings).
    pub const ALL: [ErrorCode; 33] = [
        ErrorCode::ApprovalDenied,
        ErrorCode::OperateAccessExpired,
        ErrorCode::OperateAccessRequired,
        ErrorCode::CommandTimeout,
        ErrorCode::CommandFailed,
        ErrorCode::EndpointExpired,
        ErrorCode::EndpointRetired,
        ErrorCode::InvalidOriginResourceId,
        ErrorCode::ApplianceOffline,
        ErrorCode::ApplianceRevoked,
        ErrorCode::TargetUnreachable,
        ErrorCode::ForbiddenByScope,
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::EnrollmentTokenInvalid,
        ErrorCode::EnrollmentTokenExpired,
        ErrorCode::EnrollmentTokenUsed,
        ErrorCode::CaMismatch,
        ErrorCode::AuditChainBroken,
        ErrorCode::FrameTooLarge,
        ErrorCode::MalformedFrame,
        ErrorCode::ProtocolVersion,
        ErrorCode::SessionLimit,
        ErrorCode::GatewayUnreachable,
        ErrorCode::DuplicateConnection,
        ErrorCode::Internal,
        ErrorCode::AuditUnavailable,
        ErrorCode::ApprovalInvalid,
        ErrorCode::SteadyStateDisabled,
        ErrorCode::WaitTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ApprovalDenied => "APPROVAL_DENIED",
            ErrorCode::OperateAccessExpired => "OPERATE_ACCESS_EXPIRED",
            ErrorCode::OperateAccessRequired => "OPERATE_ACCESS_REQUIRED",
            ErrorCode::CommandTimeout => "COMMAND_TIMEOUT",
            ErrorCode::CommandFailed => "COMMAND_FAILED",
            ErrorCode::EndpointExpired => "ENDPOINT_EXPIRED",
            ErrorCode::EndpointRetired => "ENDPOINT_RETIRED",
            ErrorCode::InvalidOriginResourceId => "INVALID_ORIGIN_RESOURCE_ID",
            ErrorCode::ApplianceOffline => "APPLIANCE_OFFLINE",
            ErrorCode::ApplianceRevoked => "APPLIANCE_REVOKED",
            ErrorCode::TargetUnreachable => "TARGET_UNREACHABLE",
            ErrorCode::ForbiddenByScope => "FORBIDDEN_BY_SCOPE",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::Conflict => "CONFLICT",
            ErrorCode::EnrollmentTokenInvalid => "ENROLLMENT_TOKEN_INVALID",
            ErrorCode::EnrollmentTokenExpired => "ENROLLMENT_TOKEN_EXPIRED",
            ErrorCode::EnrollmentTokenUsed => "ENROLLMENT_TOKEN_USED",
            ErrorCode::CaMismatch => "CA_MISMATCH",
            ErrorCode::AuditChainBroken => "AUDIT_CHAIN_BROKEN",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::MalformedFrame => "MALFORMED_FRAME",
            ErrorCode::ProtocolVersion => "PROTOCOL_VERSION",
            ErrorCode::SessionLimit => "SESSION_LIMIT",
            ErrorCode::GatewayUnreachable => "GATEWAY_UNREACHABLE",
            ErrorCode::DuplicateConnection => "DUPLICATE_CONNECTION",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::AuditUnavailable => "AUDIT_UNAVAILABLE",
            ErrorCode::ApprovalInvalid => "APPROVAL_INVALID",
            ErrorCode::SteadyStateDisabled => "STEADY_STATE_DISABLED",
            ErrorCode::WaitTimeout => "WAIT_TIMEOUT",
        }
    }

    /// The HTTP status the API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidOriginResourceId
            | ErrorCode::FrameTooLarge
            | ErrorCode::MalformedFrame
            | ErrorCode::ProtocolVersion => 400,
            ErrorCode::Unauthenticated
            | ErrorCode::EnrollmentTokenInvalid
            | ErrorCode::EnrollmentTokenExpired
            | ErrorCode::EnrollmentTokenUsed
            | ErrorCode::CaMismatch => 401,
            ErrorCode::Forbidden
            | ErrorCode::ForbiddenByScope
            | ErrorCode::ApprovalDenied
            | ErrorCode::ApprovalInvalid
            | ErrorCode::OperateAccessExpired
            | ErrorCode::OperateAccessRequired
            | ErrorCode::ApplianceRevoked
            | ErrorCode::SteadyStateDisabled => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::DuplicateConnection => 409,
            ErrorCode::EndpointExpired | ErrorCode::EndpointRetired => 410,
            ErrorCode::SessionLimit => 429,
            ErrorCode::ApplianceOffline | ErrorCode::GatewayUnreachable => 503,
            ErrorCode::AuditUnavailable => 503,
            ErrorCode::TargetUnreachable => 502,
            ErrorCode::CommandTimeout | ErrorCode::WaitTimeout => 504,
            ErrorCode::CommandFailed | ErrorCode::AuditChainBroken | ErrorCode::Internal => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error object of the API, the CLI and the tunnel: what went wrong, and what to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub details: serde_json::Value,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            hint: String::new(),
            details: serde_json::Value::Null,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = hint.into();
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Internal, message)
            .hint("this is a bug or an environment problem on the gateway; its log has the cause")
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if !self.hint.is_empty() {
            write!(f, " (hint: {})", self.hint)?;
        }
        Ok(())
    }
}

impl std::error::Error for ApiError {}

/// The `{"error": {...}}` envelope the API and `--output json` use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ApiError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_serialises_as_its_contract_name() {
        let e = ApiError::new(ErrorCode::InvalidOriginResourceId, "no such resource");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["code"], "INVALID_ORIGIN_RESOURCE_ID");
        assert_eq!(
            ErrorCode::InvalidOriginResourceId.as_str(),
            "INVALID_ORIGIN_RESOURCE_ID"
        );
        let back: ApiError = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn as_str_agrees_with_serde_for_every_code() {
        for c in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        let names: std::collections::BTreeSet<_> =
            ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ErrorCode::ALL.len(), "a code listed twice");
    }
}
