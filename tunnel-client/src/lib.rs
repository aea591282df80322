//! `postern-agent`: the customer's side of the tunnel.
//!
//! The agent dials out to the gateway (it never listens), reports the resources declared in
//! `agent.toml`, serves data streams only for endpoints it holds a live grant for, and runs
//! one-off ops only under a live grant and its own policy. Every decision lands in the
//! customer's own hash-chained trail.

pub mod appliance_key;
pub mod approval_check;
pub mod audit;
pub mod cert_renewal;
pub mod config;
pub mod dial;
pub mod endpoint_setup;
pub mod enroll;
pub mod gateway_trail;
pub mod grants;
pub mod kube;
pub mod malloc_policy;
pub mod metrics;
pub mod op_credentials;
pub mod op_launcher;
pub mod op_ledger;
pub mod op_output;
pub mod op_psql;
pub mod op_runner;
pub mod op_sandbox;
pub mod op_ssh;
pub mod ops;
pub mod phases;
pub mod policy_phases;
pub mod postgres;
pub mod record_approval;
pub mod sessions;
pub mod ssh;
pub mod ssh_teardown;
pub mod steady_state;
pub mod teardown_proof;
pub mod trail_heads;
pub mod trail_writer;
pub mod tunnel;
pub mod wire;

/// Reported in the hello and the enrollment request.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
