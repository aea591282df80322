//! What the gateway (`postern server`) and the agent (`postern-agent run`) both offer the
//! people who operate them: `/metrics`, `/healthz` and `/readyz` on a listener of their own
//! ([`health_http`]), and log lines as text or JSON ([`logs`]). Each binary keeps its own
//! registry and says what "ready" means for it through a [`health_http::Probe`].

pub mod health_http;
pub mod logs;

pub use health_http::{serve, Probe};
pub use logs::{init_logs, LogFormat};
