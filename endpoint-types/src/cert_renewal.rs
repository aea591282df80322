//! Agent certificate renewal over the tunnel: the frames' payloads and when to renew.
//!
//! The agent makes a fresh key and CSR in the appliance and sends [`CertRenewRequest`] on the
//! control stream; the gateway answers [`CertRenewAnswer`] with the same `request_id`: the new
//! certificate, or why it was refused. Only a gateway whose hello answer says
//! `cert_renewal: true` is asked, so an older gateway never sees a frame it cannot read.

use crate::error::ApiError;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

/// The kind of the record both trails keep for a renewal.
pub const RENEWED_KIND: &str = "agent.cert_renewed";

/// Agent → gateway: certify this key (the CSR's public key) for the connection's appliance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRenewRequest {
    /// Chosen by the agent; echoed in the answer.
    pub request_id: u64,
    pub csr_pem: String,
}

/// Gateway → agent: the answer to one [`CertRenewRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRenewAnswer {
    pub request_id: u64,
    /// The new leaf certificate (PEM), when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_pem: Option<String>,
    /// Why it was refused (then `cert_pem` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<ApiError>,
}

/// Fraction of a certificate's lifetime after which the agent renews it.
pub const RENEW_AT_NUM: i64 = 2;
pub const RENEW_AT_DEN: i64 = 3;

/// When a certificate valid `not_before..not_after` is due for renewal: two thirds into its
/// lifetime, so a third of it is left to retry in (a gateway that is down, a refusal).
pub fn renew_at(not_before: Timestamp, not_after: Timestamp) -> Timestamp {
    let lifetime = not_after.duration_since(not_before);
    if lifetime <= SignedDuration::ZERO {
        return not_before;
    }
    let nanos = lifetime.as_nanos() / i128::from(RENEW_AT_DEN) * i128::from(RENEW_AT_NUM);
    let offset = SignedDuration::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
    not_before.checked_add(offset).unwrap_or(not_after)
}

/// How long to wait before asking again after a failed attempt at `now`: a tenth of what is
/// left of the certificate, between 1 s and 5 min, so a short-lived certificate is retried
/// often enough and a long-lived one does not hammer the gateway.
pub fn retry_after(now: Timestamp, not_after: Timestamp) -> std::time::Duration {
    let left = not_after.duration_since(now).as_secs_f64().max(0.0);
    std::time::Duration::from_secs_f64((left / 10.0).clamp(1.0, 300.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn renews_two_thirds_into_the_lifetime() {
        assert_eq!(renew_at(ts(1000), ts(1900)), ts(1600));
        // 90 days: renewed after 60.
        let nb = ts(1_700_000_000);
        let na = nb.checked_add(SignedDuration::from_hours(90 * 24)).unwrap();
        assert_eq!(
            renew_at(nb, na),
            nb.checked_add(SignedDuration::from_hours(60 * 24)).unwrap()
        );
        // A certificate that is not valid for any time is due at once.
        assert_eq!(renew_at(ts(5), ts(5)), ts(5));
        assert_eq!(renew_at(ts(9), ts(5)), ts(9));
    }

    #[test]
    fn retries_within_bounds() {
        assert_eq!(retry_after(ts(0), ts(30)).as_secs(), 3);
        assert_eq!(retry_after(ts(0), ts(2)).as_secs(), 1);
        assert_eq!(retry_after(ts(100), ts(50)).as_secs(), 1);
        assert_eq!(retry_after(ts(0), ts(90 * 86_400)).as_secs(), 300);
    }

    #[test]
    fn answers_round_trip_and_omit_what_is_absent() {
        let a = CertRenewAnswer {
            request_id: 7,
            cert_pem: Some("PEM".into()),
            refused: None,
        };
        let s = serde_json::to_string(&a).unwrap();
        assert!(!s.contains("refused"), "{s}");
        assert_eq!(serde_json::from_str::<CertRenewAnswer>(&s).unwrap(), a);
    }
}
