//! What the gateway tells an appliance's customer trail: every request, decision and outcome
//! concerning the appliance that the gateway decided or saw, also those that never reached the
//! appliance (a request denied or expired before dispatch).
//!
//! The gateway numbers these records per appliance (1, 2, 3 … without gaps) and delivers them
//! over the acknowledged command path; the agent writes each into its own hash-chained trail
//! exactly once, under the event's name as the record's kind.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The key of a trail record's detail that holds its gateway number. Inside a JSON line the
/// unescaped text `"gateway_number":` can only be a key, never part of a string.
pub const NUMBER_KEY: &str = "gateway_number";

/// A request, decision or outcome concerning one appliance, as the gateway records it. The
/// names are the vendor trail's record kinds for the same events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GatewayEvent {
    #[serde(rename = "grant.requested")]
    GrantRequested,
    #[serde(rename = "grant.approved")]
    GrantApproved,
    #[serde(rename = "grant.denied")]
    GrantDenied,
    #[serde(rename = "grant.revoked")]
    GrantRevoked,
    /// Ran out (by the gateway's clock; the agent ends it by its own).
    #[serde(rename = "grant.expired")]
    GrantExpired,
    #[serde(rename = "op.requested")]
    OpRequested,
    #[serde(rename = "op.approved")]
    OpApproved,
    #[serde(rename = "op.denied")]
    OpDenied,
    /// Expired before it was dispatched (its grant ended first).
    #[serde(rename = "op.expired")]
    OpExpired,
    /// A policy approval that no longer held at dispatch: back to a person.
    #[serde(rename = "op.requeued")]
    OpRequeued,
    #[serde(rename = "output.approved")]
    OutputApproved,
    #[serde(rename = "output.denied")]
    OutputDenied,
    #[serde(rename = "endpoint.requested")]
    EndpointRequested,
    /// Approved (by a person or the policy) and made live.
    #[serde(rename = "endpoint.created")]
    EndpointCreated,
    #[serde(rename = "endpoint.denied")]
    EndpointDenied,
    #[serde(rename = "endpoint.retired")]
    EndpointRetired,
    #[serde(rename = "endpoint.expired")]
    EndpointExpired,
    #[serde(rename = "appliance.revoked")]
    ApplianceRevoked,
}

impl GatewayEvent {
    pub const ALL: [GatewayEvent; 18] = [
        GatewayEvent::GrantRequested,
        GatewayEvent::GrantApproved,
        GatewayEvent::GrantDenied,
        GatewayEvent::GrantRevoked,
        GatewayEvent::GrantExpired,
        GatewayEvent::OpRequested,
        GatewayEvent::OpApproved,
        GatewayEvent::OpDenied,
        GatewayEvent::OpExpired,
        GatewayEvent::OpRequeued,
        GatewayEvent::OutputApproved,
        GatewayEvent::OutputDenied,
        GatewayEvent::EndpointRequested,
        GatewayEvent::EndpointCreated,
        GatewayEvent::EndpointDenied,
        GatewayEvent::EndpointRetired,
        GatewayEvent::EndpointExpired,
        GatewayEvent::ApplianceRevoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GatewayEvent::GrantRequested => "grant.requested",
            GatewayEvent::GrantApproved => "grant.approved",
            GatewayEvent::GrantDenied => "grant.denied",
            GatewayEvent::GrantRevoked => "grant.revoked",
            GatewayEvent::GrantExpired => "grant.expired",
            GatewayEvent::OpRequested => "op.requested",
            GatewayEvent::OpApproved => "op.approved",
            GatewayEvent::OpDenied => "op.denied",
            GatewayEvent::OpExpired => "op.expired",
            GatewayEvent::OpRequeued => "op.requeued",
            GatewayEvent::OutputApproved => "output.approved",
            GatewayEvent::OutputDenied => "output.denied",
            GatewayEvent::EndpointRequested => "endpoint.requested",
            GatewayEvent::EndpointCreated => "endpoint.created",
            GatewayEvent::EndpointDenied => "endpoint.denied",
            GatewayEvent::EndpointRetired => "endpoint.retired",
            GatewayEvent::EndpointExpired => "endpoint.expired",
            GatewayEvent::ApplianceRevoked => "appliance.revoked",
        }
    }

    /// The event a record kind names (the vendor trail's kind, or a customer trail record's).
    pub fn parse(kind: &str) -> Option<GatewayEvent> {
        GatewayEvent::ALL.into_iter().find(|e| e.as_str() == kind)
    }

    /// Whether the event opens a new request: these are refused while the appliance's queue
    /// of undelivered records is full; decisions and outcomes never are.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            GatewayEvent::GrantRequested
                | GatewayEvent::OpRequested
                | GatewayEvent::EndpointRequested
        )
    }
}

impl std::fmt::Display for GatewayEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One record for an appliance's customer trail, as the gateway sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayRecord {
    /// Per appliance, from 1, without gaps.
    pub number: u64,
    pub event: GatewayEvent,
    /// When the gateway recorded it.
    pub time: Timestamp,
    /// Who: the requester, or the decider (a person, `policy:automatic`, `policy:window`,
    /// `system:gateway`).
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
    /// What the vendor trail holds about it (ids, level, command, message, reason…).
    pub detail: serde_json::Value,
    /// The vendor trail's record of the same event: its seq and hash.
    pub gateway_seq: i64,
    pub gateway_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_serde() {
        for e in GatewayEvent::ALL {
            assert_eq!(GatewayEvent::parse(e.as_str()), Some(e));
            assert_eq!(
                serde_json::to_value(e).unwrap(),
                serde_json::json!(e.as_str())
            );
        }
        assert_eq!(GatewayEvent::parse("sql.statement"), None);
        assert_eq!(GatewayEvent::parse("denied"), None);
    }
}
