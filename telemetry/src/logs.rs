//! `--log-format text|json`: log lines on stderr, filtered by `RUST_LOG`.

use std::io::IsTerminal;

/// How log lines are written on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (coloured on a terminal).
    Text,
    /// One JSON object per line: `{"timestamp","level","fields":{"message",…},"target"}`.
    Json,
}

/// Installs the process's subscriber: `RUST_LOG` when set, else `default` (e.g. `info`).
/// A second call is a no-op.
pub fn init_logs(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).try_init(),
        LogFormat::Json => fmt.json().try_init(),
    };
}
