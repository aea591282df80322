//! Proof of teardown: what the agent checked when an endpoint ended, signed with the
//! appliance's key so that anyone holding the appliance's certificate can tell the record is
//! the agent's and unedited (`endpoint.teardown` in both trails, `postern audit teardown`).
//!
//! The canonical form follows [`crate::approval`]: a version line, then one `name: value` line
//! per field in a fixed order, every value JSON-encoded, so a value can never hold a line
//! break or pass for another field. Each check is one line holding a JSON array
//! `[name, passed, took_ms, detail]`. The signature is made and checked in the `certs` crate.

use crate::resource::{CloseReason, EndpointType};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// First line of every proof's canonical bytes; a new layout gets a new version line.
pub const PROOF_VERSION: &str = "postern-teardown-v1";

/// The record kind in both trails.
pub const TEARDOWN_KIND: &str = "endpoint.teardown";

/// The checks a proof carries, by name. Every proof has [`check::SESSIONS_CUT`]; the others
/// are per protocol.
pub mod check {
    /// Every session of the endpoint was cut and has ended (for SSH each session is one
    /// upstream SSH connection of the agent's, so this is "the upstream sessions ended").
    pub const SESSIONS_CUT: &str = "sessions_cut";
    /// A new session of the endpoint is refused by the agent's own table.
    pub const NEW_SESSIONS_REFUSED: &str = "new_sessions_refused";
    /// PostgreSQL: the endpoint's role is gone from `pg_roles`.
    pub const PG_ROLE_GONE: &str = "pg_role_gone";
    /// PostgreSQL: no backend of the role is left in `pg_stat_activity`.
    pub const PG_BACKENDS_GONE: &str = "pg_backends_gone";
    /// SSH: the VM teardown as the login user ran to its end (what it ended is in the detail).
    pub const SSH_VM_CLEANUP: &str = "ssh_vm_cleanup";
    /// Kubernetes: a request under the endpoint's certificate is refused by the agent's proxy.
    pub const KUBE_CERTIFICATE_REFUSED: &str = "kube_certificate_refused";
}

/// One thing the agent checked, and how long checking it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownCheck {
    pub name: String,
    pub passed: bool,
    pub took_ms: u64,
    /// What was seen (counts, the refusal code, what the VM teardown ended).
    pub detail: String,
}

/// What the agent proves about one ended endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownProof {
    pub endpoint_id: String,
    pub appliance_id: String,
    pub endpoint_type: EndpointType,
    pub resource_id: String,
    pub reason: CloseReason,
    /// When the agent ended the endpoint (or found, after a reconnect, that it had ended).
    pub ended_at: Timestamp,
    /// When the checks were done and the proof signed.
    pub proved_at: Timestamp,
    /// The endpoint ended while the agent was disconnected or stopped; it was torn down and
    /// proved once the agent was back.
    pub offline: bool,
    pub checks: Vec<TeardownCheck>,
}

impl TeardownProof {
    /// The bytes the appliance key signs.
    pub fn canonical(&self) -> String {
        let mut out = String::with_capacity(512);
        out.push_str(PROOF_VERSION);
        out.push('\n');
        let mut line = |name: &str, value: serde_json::Value| {
            // JSON text of a value never holds a raw line break.
            let _ = writeln!(out, "{name}: {value}");
        };
        line("kind", TEARDOWN_KIND.into());
        line("endpoint_id", self.endpoint_id.as_str().into());
        line("appliance_id", self.appliance_id.as_str().into());
        line("endpoint_type", self.endpoint_type.as_str().into());
        line("resource_id", self.resource_id.as_str().into());
        line("reason", self.reason.as_str().into());
        line("ended_at", self.ended_at.to_string().into());
        line("proved_at", self.proved_at.to_string().into());
        line("offline", self.offline.into());
        line("checks", self.checks.len().into());
        for c in &self.checks {
            line(
                "check",
                serde_json::json!([c.name, c.passed, c.took_ms, c.detail]),
            );
        }
        out
    }

    /// Whether every check passed.
    pub fn all_passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    pub fn check(&self, name: &str) -> Option<&TeardownCheck> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// A proof and the appliance key's signature over its canonical bytes (standard base64 of an
/// ECDSA P-256 / SHA-256 DER signature, `certs::record_signature`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedTeardown {
    pub proof: TeardownProof,
    pub signature: String,
}

/// `GET /v1/audit/teardown/{endpoint_id}`: the stored proof as the gateway received it, with
/// the certificate of the appliance key that signed it. The client checks it: the gateway's
/// word is not needed (see `postern audit teardown`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownRecord {
    pub endpoint_id: String,
    /// The appliance the gateway's endpoint record names.
    pub appliance_id: String,
    pub signed: SignedTeardown,
    /// PEM of the appliance certificate on the connection that delivered the proof.
    pub cert_pem: String,
    pub received_at: Timestamp,
}

/// What `postern audit teardown` prints for a record that verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownVerified {
    pub endpoint_id: String,
    pub verified: bool,
    /// Every check in the proof passed.
    pub all_checks_passed: bool,
    pub signer: String,
    pub cert_fingerprint: String,
    pub proof: TeardownProof,
    pub signature: String,
    pub received_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proof() -> TeardownProof {
        TeardownProof {
            endpoint_id: "ep_1".into(),
            appliance_id: "apl_1".into(),
            endpoint_type: EndpointType::Postgres,
            resource_id: "aws_db_instance.main".into(),
            reason: CloseReason::Retired,
            ended_at: "2026-01-01T00:00:00.123Z".parse().unwrap(),
            proved_at: "2026-01-01T00:00:01Z".parse().unwrap(),
            offline: false,
            checks: vec![
                TeardownCheck {
                    name: check::SESSIONS_CUT.into(),
                    passed: true,
                    took_ms: 12,
                    detail: "1 session cut, none left".into(),
                },
                TeardownCheck {
                    name: check::PG_ROLE_GONE.into(),
                    passed: true,
                    took_ms: 3,
                    detail: "0 rows in pg_roles".into(),
                },
            ],
        }
    }

    #[test]
    fn canonical_bytes_are_fixed_line_by_line() {
        assert_eq!(
            proof().canonical(),
            "postern-teardown-v1\n\
             kind: \"endpoint.teardown\"\n\
             endpoint_id: \"ep_1\"\n\
             appliance_id: \"apl_1\"\n\
             endpoint_type: \"postgres\"\n\
             resource_id: \"aws_db_instance.main\"\n\
             reason: \"retired\"\n\
             ended_at: \"2026-01-01T00:00:00.123Z\"\n\
             proved_at: \"2026-01-01T00:00:01Z\"\n\
             offline: false\n\
             checks: 2\n\
             check: [\"sessions_cut\",true,12,\"1 session cut, none left\"]\n\
             check: [\"pg_role_gone\",true,3,\"0 rows in pg_roles\"]\n"
        );
    }

    #[test]
    fn every_field_changes_the_bytes_and_none_can_pass_for_another() {
        let base = proof().canonical();
        type Edit = Box<dyn Fn(&mut TeardownProof)>;
        let edits: Vec<Edit> = vec![
            Box::new(|p| p.endpoint_id = "ep_2".into()),
            Box::new(|p| p.appliance_id = "apl_2".into()),
            Box::new(|p| p.endpoint_type = EndpointType::Ssh),
            Box::new(|p| p.resource_id = "x".into()),
            Box::new(|p| p.reason = CloseReason::Expired),
            Box::new(|p| p.ended_at = "2026-01-01T00:00:00Z".parse().unwrap()),
            Box::new(|p| p.proved_at = "2026-01-01T00:00:02Z".parse().unwrap()),
            Box::new(|p| p.offline = true),
            Box::new(|p| p.checks[0].passed = false),
            Box::new(|p| p.checks[1].took_ms = 4),
            Box::new(|p| p.checks[1].detail = "1 row in pg_roles".into()),
            Box::new(|p| p.checks[1].name = check::PG_BACKENDS_GONE.into()),
            Box::new(|p| {
                p.checks.pop();
            }),
            // A line break in a value cannot forge a line of its own.
            Box::new(|p| p.resource_id = "x\noffline: true".into()),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut p = proof();
            edit(&mut p);
            let c = p.canonical();
            assert_ne!(c, base, "edit {i} left the bytes unchanged");
            assert_eq!(
                c.lines().count(),
                base.lines().count() - usize::from(i == 12)
            );
        }
    }

    #[test]
    fn a_proof_reads_back_to_the_same_bytes() {
        let signed = SignedTeardown {
            proof: proof(),
            signature: "c2ln".into(),
        };
        let text = serde_json::to_string(&signed).unwrap();
        let back: SignedTeardown = serde_json::from_str(&text).unwrap();
        assert_eq!(back.proof.canonical(), signed.proof.canonical());
        assert!(back.proof.all_passed());
        let mut failed = proof();
        failed.checks[1].passed = false;
        assert!(!failed.all_passed());
        failed.checks.clear();
        assert!(
            !failed.all_passed(),
            "a proof with no checks proves nothing"
        );
    }
}
