//! The startup policy of a postgres endpoint, shared by the gateway's front end and the agent
//! (which applies it again: it is the customer's enforcement point).
//!
//! Only an allow-list of session settings passes, as startup parameters or as `-c name=value`
//! / `--name=value` words in `options`; everything else is refused with a FATAL the client
//! prints. An allow-list rather than a deny-list because the server reads any unknown startup
//! parameter as a setting (`search_path` would let a session resolve names in a schema the
//! vendor controls, `role`/`session_authorization` would change who it is), and `options` is
//! a command line for the backend: `-ecrole=x` is `-e` then `-c role=x` to its getopt.

use crate::pgwire::{sqlstate, PgError};

/// Settings a client may choose for its session (GUC names, compared case-insensitively):
/// what drivers send on their own (libpq, pgjdbc, Npgsql, psycopg) and presentation or
/// self-limiting settings. None changes who the session is or where names resolve.
pub const ALLOWED_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "bytea_output",
    "client_min_messages",
    "geqo",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "default_transaction_isolation",
    "default_transaction_read_only",
];

/// What the front end does with a client's startup parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sanitized {
    /// Parameters to pass on to the real server (never `user`, `database`, `replication`).
    pub forward: Vec<(String, String)>,
    /// Names dropped silently (`replication = false` and our own internal names).
    pub stripped: Vec<String>,
    /// `_pq_.` options to list in NegotiateProtocolVersion.
    pub protocol_options: Vec<String>,
}

/// GUC names compare case-insensitively, and `-` stands for `_` in `--name=value` (the
/// server's `ParseLongOption`).
pub fn guc_name(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "_")
}

pub fn allowed_setting(name: &str) -> bool {
    ALLOWED_SETTINGS.contains(&guc_name(name).as_str())
}

fn truthy(v: &str) -> bool {
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "false" | "off" | "no" | "0" | "f" | "n"
    )
}

/// Splits `options` like the server does (`pg_split_opts`): whitespace separates, a
/// backslash takes the next character literally. [`option_settings`] accepts printable
/// ASCII only, so what counts as whitespace (C `isspace`, locale-dependent) is never in doubt.
pub fn split_options(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            c if c.is_ascii_whitespace() || c == '\x0b' => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The `(name, value)` settings an `options` value makes, or why it is refused: every word
/// must be a setting (`-c name=value`, `-cname=value`, `--name=value`) of an allowed name.
/// Any other backend switch, alone or clustered (`-e`, `-ecrole=x`, `-d 5`), is refused.
pub fn option_settings(options: &str) -> Result<Vec<(String, String)>, String> {
    if let Some(c) = options
        .chars()
        .find(|c| !(c.is_ascii_graphic() || *c == ' '))
    {
        return Err(format!(
            "options may hold printable ASCII and spaces only, not {c:?}"
        ));
    }
    let words = split_options(options);
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(w) = words.get(i) {
        let setting = if w == "-c" {
            i += 1;
            words
                .get(i)
                .map(String::as_str)
                .ok_or_else(|| "options: `-c` needs name=value".to_string())?
        } else if let Some(s) = w.strip_prefix("--") {
            s
        } else if let Some(s) = w.strip_prefix("-c") {
            s
        } else {
            return Err(format!(
                "options: \"{w}\" is not allowed; only -c name=value settings are"
            ));
        };
        let Some((name, value)) = setting.split_once('=') else {
            return Err(format!("options: \"{setting}\" needs a value (name=value)"));
        };
        if !allowed_setting(name) {
            return Err(format!(
                "setting \"{name}\" in options is not allowed through an ops endpoint"
            ));
        }
        out.push((name.to_string(), value.to_string()));
        i += 1;
    }
    Ok(out)
}

fn refuse(what: String) -> PgError {
    PgError::fatal(sqlstate::INSUFFICIENT_PRIVILEGE, what).hint(format!(
        "an ops endpoint's identity and scope are fixed by the appliance; the settings a client may choose are {}",
        ALLOWED_SETTINGS.join(", ")
    ))
}

/// Applies the endpoint's startup policy. `database` absent means the endpoint's own; any
/// other is refused, as are `replication`, and every setting not in [`ALLOWED_SETTINGS`]
/// whether a parameter of its own or in `options`. Names under `postern.` are ours (the
/// gateway's cancel key for the agent) and are never forwarded.
pub fn sanitize(
    params: &[(String, String)],
    endpoint_database: &str,
) -> Result<Sanitized, PgError> {
    let mut s = Sanitized {
        forward: Vec::new(),
        stripped: Vec::new(),
        protocol_options: Vec::new(),
    };
    for (name, value) in params {
        match name.as_str() {
            "user" => {}
            "database" => {
                if !value.is_empty() && value != endpoint_database {
                    return Err(refuse(format!("this endpoint serves database \"{endpoint_database}\" only, not \"{value}\"")));
                }
            }
            "replication" => {
                if truthy(value) {
                    return Err(refuse(
                        "replication connections are not allowed through an ops endpoint".into(),
                    ));
                }
                s.stripped.push(name.clone());
            }
            "options" => {
                option_settings(value).map_err(refuse)?;
                s.forward.push((name.clone(), value.clone()));
            }
            n if n.starts_with("_pq_.") => s.protocol_options.push(name.clone()),
            n if guc_name(n).starts_with("postern.") => s.stripped.push(name.clone()),
            n if allowed_setting(n) => s.forward.push((name.clone(), value.clone())),
            n => {
                return Err(refuse(format!(
                    "startup parameter \"{n}\" is not allowed through an ops endpoint"
                )))
            }
        }
    }
    Ok(s)
}

#[cfg(test)]
#[path = "pg_startup_tests.rs"]
mod tests;
