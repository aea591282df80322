//! CLI profiles: named gateways (address, CA file, token file) in
//! `$XDG_CONFIG_HOME/postern/config.toml` (default `~/.config/postern/config.toml`), picked with
//! `--profile NAME` or `POSTERN_PROFILE`. `--addr`/`POSTERN_ADDR`, `--ca-file`/`POSTERN_CA_FILE`
//! and `--token`/`POSTERN_TOKEN` win over the profile, one setting at a time.

use super::{client::ApiClient, print_json, OutputFormat};
use clap::Subcommand;
use endpoint_types::ApiError;
use serde::{Deserialize, Serialize};
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

#[derive(Debug, Subcommand)]
pub enum ProfileCmd {
    /// Add (or replace) a profile.
    Add {
        /// The profile's name (for --profile / POSTERN_PROFILE).
        name: String,
        /// Gateway API address (the `api` of `postern server`).
        #[arg(long)]
        addr: String,
        /// CA certificate the gateway API is verified with.
        #[arg(long)]
        ca_file: PathBuf,
        /// File holding the API token (readable by you only: chmod 600).
        #[arg(long)]
        token_file: PathBuf,
    },
    /// The profiles in the config file.
    List,
}

/// The CLI's config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub addr: String,
    pub ca_file: PathBuf,
    pub token_file: PathBuf,
}

/// Where the config file is: `$XDG_CONFIG_HOME/postern/config.toml`, else under `$HOME/.config`.
pub fn config_path() -> Result<PathBuf, ApiError> {
    let non_empty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(x) = non_empty("XDG_CONFIG_HOME") {
        return Ok(PathBuf::from(x).join("postern").join("config.toml"));
    }
    non_empty("HOME")
        .map(|h| PathBuf::from(h).join(".config/postern/config.toml"))
        .ok_or_else(|| {
            ApiError::invalid("neither XDG_CONFIG_HOME nor HOME is set")
                .hint("the CLI keeps its profiles in $XDG_CONFIG_HOME/postern/config.toml")
        })
}

fn bad_config(path: &Path, why: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("CLI config {}: {why}", path.display()))
        .hint("it holds [profiles.NAME] tables with addr, ca_file and token_file; `postern profile add` writes it")
}

/// The config file, or an empty one when there is none yet.
pub fn load(path: &Path) -> Result<CliConfig, ApiError> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| bad_config(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CliConfig::default()),
        Err(e) => Err(bad_config(path, e)),
    }
}

fn check_profile_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(
            ApiError::invalid(format!("profile name {name:?} is not valid"))
                .hint("a profile name is 1–64 letters, digits, - _ or ."),
        )
    }
}

fn absolute(flag: &str, p: &Path) -> Result<PathBuf, ApiError> {
    std::path::absolute(p).map_err(|e| ApiError::invalid(format!("--{flag} {}: {e}", p.display())))
}

/// A token file anyone else can read is refused: the token is a password.
fn check_token_file(path: &Path) -> Result<(), ApiError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        ApiError::invalid(format!("cannot read token file {}: {e}", path.display()))
            .hint("save the token `postern token create` printed to a file first")
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ApiError::invalid(format!(
                "token file {} can be read by others",
                path.display()
            ))
            .hint(format!("chmod 600 {}", path.display())));
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    Ok(())
}

pub fn run(cmd: ProfileCmd, out: OutputFormat) -> Result<(), ApiError> {
    let path = config_path()?;
    let mut cfg = load(&path)?;
    match cmd {
        ProfileCmd::Add {
            name,
            addr,
            ca_file,
            token_file,
        } => {
            check_profile_name(&name)?;
            let profile = Profile {
                addr,
                ca_file: absolute("ca-file", &ca_file)?,
                token_file: absolute("token-file", &token_file)?,
            };
            std::fs::metadata(&profile.ca_file).map_err(|e| {
                ApiError::invalid(format!(
                    "cannot read CA file {}: {e}",
                    profile.ca_file.display()
                ))
                .hint("give the `ca_file` printed by `postern server`")
            })?;
            check_token_file(&profile.token_file)?;
            cfg.profiles.insert(name.clone(), profile.clone());
            let text = toml::to_string(&cfg).map_err(|e| bad_config(&path, e))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| bad_config(&path, e))?;
            }
            certs::write_private(&path, text.as_bytes()).map_err(|e| bad_config(&path, e))?;
            match out {
                OutputFormat::Json => print_json(&serde_json::json!({
                    "profile": name, "addr": profile.addr, "ca_file": profile.ca_file,
                    "token_file": profile.token_file, "config": path,
                })),
                OutputFormat::Text => println!(
                    "profile {name} saved in {}; use it with --profile {name} or POSTERN_PROFILE={name}",
                    path.display()
                ),
            }
        }
        ProfileCmd::List => match out {
            OutputFormat::Json => print_json(&serde_json::json!({
                "config": path,
                "profiles": cfg.profiles.iter().map(|(name, p)| serde_json::json!({
                    "name": name, "addr": p.addr, "ca_file": p.ca_file, "token_file": p.token_file,
                })).collect::<Vec<_>>(),
            })),
            OutputFormat::Text => {
                for (name, p) in &cfg.profiles {
                    println!(
                        "{name:<16} {:<24} ca {}  token {}",
                        p.addr,
                        p.ca_file.display(),
                        p.token_file.display()
                    );
                }
            }
        },
    }
    Ok(())
}

/// How the CLI reaches the gateway: the flags and environment, then the profile for what
/// they leave unset.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub addr: Option<String>,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub profile: Option<String>,
}

impl Connection {
    pub fn client(&self) -> Result<ApiClient, ApiError> {
        let Some(name) = &self.profile else {
            return ApiClient::new(self.addr.clone(), self.token.clone(), self.ca_file.clone());
        };
        let path = config_path()?;
        let cfg = load(&path)?;
        let p = cfg.profiles.get(name).ok_or_else(|| {
            let known: Vec<&str> = cfg.profiles.keys().map(String::as_str).collect();
            ApiError::invalid(format!("no profile {name:?} in {}", path.display())).hint(
                if known.is_empty() {
                    "add one with `postern profile add NAME --addr A --ca-file F --token-file T`"
                        .to_string()
                } else {
                    format!("known profiles: {}", known.join(", "))
                },
            )
        })?;
        let token = match &self.token {
            Some(t) => Some(t.clone()),
            None => Some(std::fs::read_to_string(&p.token_file).map_err(|e| {
                ApiError::invalid(format!(
                    "profile {name}: cannot read token file {}: {e}",
                    p.token_file.display()
                ))
                .hint("point the profile at the file holding your token (`postern profile add` again)")
            })?),
        };
        ApiClient::new(
            self.addr.clone().or_else(|| Some(p.addr.clone())),
            token,
            self.ca_file.clone().or_else(|| Some(p.ca_file.clone())),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_and_refuses_unknown_keys() {
        let mut cfg = CliConfig::default();
        cfg.profiles.insert(
            "prod".into(),
            Profile {
                addr: "gw.example:8443".into(),
                ca_file: "/etc/postern/ca.crt".into(),
                token_file: "/home/a/.config/postern/prod.token".into(),
            },
        );
        let text = toml::to_string(&cfg).unwrap();
        let back: CliConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.profiles, cfg.profiles);
        let typo = text.replace("token_file", "tokenfile");
        let e = toml::from_str::<CliConfig>(&typo).unwrap_err().to_string();
        assert!(e.contains("tokenfile"), "{e}");
        assert!(toml::from_str::<CliConfig>("[profile.x]\naddr = \"a\"\n").is_err());
    }

    #[test]
    fn profile_names_are_plain() {
        assert!(check_profile_name("prod-eu.1").is_ok());
        for bad in ["", "a b", "x/y", "../z"] {
            assert!(check_profile_name(bad).is_err(), "{bad}");
        }
    }
}
