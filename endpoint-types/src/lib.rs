//! The vocabulary shared by the gateway, the agent and the CLI.
//!
//! Everything here is plain data and pure functions: no sockets, no files, no clocks
//! (callers pass `now`). The tunnel frame codec is a sans-IO state machine in [`frame`].

pub mod api;
pub mod approval;
pub mod asciicast;
pub mod cert_renewal;
pub mod chunk_write;
pub mod control;
pub mod customer_trail;
pub mod duration;
pub mod error;
pub mod frame;
pub mod kube_names;
pub mod kube_request;
pub mod lifecycle;
pub mod op_command;
pub mod pg_startup;
pub mod pgwire;
pub mod phase;
pub mod phase_policy;
pub mod policy;
pub mod resource;
pub mod secret;
pub mod ssh_scope;
pub mod ssh_stream;
pub mod steady_state;
pub mod teardown;
pub mod token;
pub mod trail_head;
pub mod vm_facts;

pub use error::{ApiError, ErrorCode, ErrorEnvelope};

/// ALPN of the agent ⇄ gateway tunnel.
pub const ALPN_TUNNEL: &[u8] = b"postern/1";
/// ALPN of one-shot enrollment over the relay port (no client certificate yet).
pub const ALPN_ENROLL: &[u8] = b"postern-enroll/1";
/// Version carried in the agent's hello; the gateway refuses versions it does not speak.
pub const PROTOCOL_VERSION: u16 = 1;
