//! The Postern gateway: control plane, QUIC relay, endpoint listeners and the `postern` CLI.

pub mod admin_recovery;
pub mod agents;
pub mod api;
pub mod api_tokens;
pub mod approvals;
pub mod audit;
pub mod audit_heads;
pub mod cli;
pub mod config;
pub mod customer_trail;
pub mod delivery;
pub mod endpoints;
pub mod framed;
pub mod grants;
pub mod head_pacing;
pub mod identity;
pub mod notify;
pub mod ops;
pub mod ports;
pub mod relay;
pub mod server;
pub mod store;
pub mod teardown_proofs;
