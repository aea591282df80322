//! Umbrella package: the harness the end-to-end tests and examples share. It runs the real
//! `postern` and `postern-agent` binaries as processes, the way an operator would.

pub mod approver;
pub mod kube_apiserver;
pub mod pg_cluster;
pub mod scrape;
pub mod sshd;
pub mod tcp_endpoint;
pub mod teardown_check;
pub mod testbed;
pub mod webhook_receiver;
