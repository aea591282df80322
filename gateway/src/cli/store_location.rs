//! Where a gateway's state is, as `postern server` and `postern admin recover` (run on the
//! gateway host) are told: a config file, or a data dir and optionally a store URL.

use crate::config::{self, GatewayConfig};
use clap::Args;
use endpoint_types::ApiError;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct StoreLocation {
    /// The gateway's config file (TOML); its data dir and store are used.
    #[arg(
        long,
        conflicts_with = "data_dir",
        required_unless_present = "data_dir"
    )]
    config: Option<PathBuf>,
    /// The gateway's data dir: CA, store, admin token.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Store URL (`sqlite:PATH`, `postgres://…`); default: the config's, else the embedded
    /// store in the data dir.
    #[arg(long)]
    store: Option<String>,
}

impl StoreLocation {
    /// The config file's settings (or the defaults for the data dir), `--store` winning.
    pub fn gateway_config(self) -> Result<GatewayConfig, ApiError> {
        let mut cfg = match (self.config, self.data_dir) {
            (Some(path), _) => config::load(&path).map_err(|e| ApiError::invalid(e.to_string()))?,
            (None, Some(dir)) => GatewayConfig::new(dir),
            (None, None) => return Err(ApiError::invalid("give --config FILE or --data-dir DIR")),
        };
        if self.store.is_some() {
            cfg.store = self.store;
        }
        Ok(cfg)
    }
}
