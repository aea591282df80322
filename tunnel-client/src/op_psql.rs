//! What a `psql` op may say. The op runs the real `psql` (its output is what operators know),
//! but only in forms that cannot leave the database the agent connected it to:
//!
//! - **Options**: an allow-list of formatting and SQL options (`-c`, `-A`, `-t`, `-x`, `-q`,
//!   `-F`, `-R`, `-P`, `-v`, `--csv`, …). Everything that picks another server, database, user
//!   or service (`-h`, `-p`, `-U`, `-d`, a positional `dbname`/`service=`/URI), reads or writes
//!   appliance files (`-f`, `-o`, `-L`, a `-o '|cmd'` pipe) is refused: the connection is the
//!   one the agent sets up (`PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSFILE` for a role
//!   made for the op), and `-X` is always added so no psqlrc runs.
//! - **`-c` strings**: psql sends a `-c` string that does not start with a backslash to the
//!   server as it is, without looking for meta-commands or interpolating variables; one that
//!   starts with a backslash is a single meta-command, and meta-commands can run programs
//!   (`\!`, `\copy … program`, `\o |…`, `\g |…`, `\w |…`, backquotes in any argument) or touch
//!   the appliance's files (`\i`, `\ir`, `\o file`, `\w file`, `\copy … 'file'`, `\setenv`).
//!   So a meta-command is refused unless it is a read-only describe (`\d…`, `\l`, `\dn`, …,
//!   `\conninfo`) whose arguments are plain name patterns.
//! - **SQL**: the op's role has no `pg_execute_server_program` or file privileges, so the
//!   server itself refuses `COPY … PROGRAM` and server files; the agent also refuses `COPY …
//!   PROGRAM` before it runs, so the refusal is clear and audited.
//!
//! stdin is empty, so psql never reads commands interactively.

use endpoint_types::{ApiError, ErrorCode};
use serde_json::json;

/// A refused psql command: what in it, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("this psql command is refused: {what} {why}")]
pub struct PsqlRefusal {
    pub what: String,
    pub why: &'static str,
}

impl PsqlRefusal {
    pub fn to_api_error(&self) -> ApiError {
        ApiError::new(ErrorCode::ForbiddenByScope, self.to_string())
            .hint("a psql op runs SQL with -c \"…\" (plus formatting options such as -A, -t, -x, --csv) against the resource's database as a role made for the op; meta-commands other than describes (\\d, \\l, \\dn, \\conninfo, …) and options that choose a server, file or program are not available")
            .details(json!({ "refused": self.what, "reason": self.why }))
    }
}

fn refuse(what: impl Into<String>, why: &'static str) -> PsqlRefusal {
    PsqlRefusal {
        what: what.into(),
        why,
    }
}

/// Short options taking no value.
const FLAGS: &str = "AaebEHnqSstxXz01";
/// Short options taking a value (attached or the next word).
const WITH_VALUE: &str = "cFRPvT";
const LONG_FLAGS: &[&str] = &[
    "--no-align",
    "--echo-all",
    "--echo-errors",
    "--echo-queries",
    "--echo-hidden",
    "--html",
    "--no-readline",
    "--quiet",
    "--single-line",
    "--single-step",
    "--tuples-only",
    "--expanded",
    "--no-psqlrc",
    "--field-separator-zero",
    "--record-separator-zero",
    "--single-transaction",
    "--csv",
];
const LONG_WITH_VALUE: &[&str] = &[
    "--command",
    "--field-separator",
    "--record-separator",
    "--pset",
    "--set",
    "--variable",
    "--table-attr",
];

/// Describe meta-commands: read the catalog, run nothing, touch no file.
const DESCRIBES: &[&str] = &[
    "d", "d+", "dt", "dt+", "dn", "dn+", "di", "di+", "dv", "dv+", "dm", "dm+", "ds", "ds+", "df",
    "df+", "du", "du+", "dg", "dg+", "dp", "dx", "dx+", "dD", "dT", "dT+", "dE", "db", "dc", "dC",
    "dd", "dy", "dF", "l", "l+", "z", "conninfo",
];

/// Checks a psql op's argv (as `ops::parse_command` split it) and returns the argv to run:
/// the same words with `-X` first.
pub fn check(argv: &[String]) -> Result<Vec<String>, PsqlRefusal> {
    let mut out = vec!["psql".to_string(), "-X".to_string()];
    let mut commands = 0;
    let mut words = argv.iter().skip(1);
    while let Some(w) = words.next() {
        let value_of = |name: &str,
                        attached: Option<&str>,
                        next: Option<&String>|
         -> Result<String, PsqlRefusal> {
            attached
                .map(str::to_string)
                .or_else(|| next.cloned())
                .ok_or_else(|| refuse(name.to_string(), "needs a value"))
        };
        if let Some(long) = w.strip_prefix("--") {
            if long.is_empty() {
                return Err(refuse(
                    "--",
                    "ends the options; a psql op takes no database, user or connection string",
                ));
            }
            let (name, attached) = match w.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (w.as_str(), None),
            };
            if LONG_FLAGS.contains(&name) && attached.is_none() {
                out.push(w.clone());
            } else if LONG_WITH_VALUE.contains(&name) {
                let value = if attached.is_some() {
                    value_of(name, attached, None)?
                } else {
                    value_of(name, None, words.next())?
                };
                if name == "--command" {
                    check_command(&value)?;
                    commands += 1;
                }
                if matches!(name, "--set" | "--variable") {
                    check_variable(&value)?;
                }
                out.push(format!("{name}={value}"));
            } else {
                return Err(refuse(name, not_allowed_why(name)));
            }
            continue;
        }
        let Some(cluster) = w.strip_prefix('-').filter(|c| !c.is_empty()) else {
            return Err(refuse(
                w.clone(),
                "is a database, user or connection string; the appliance chooses the connection",
            ));
        };
        // getopt clusters: flags, and at most one value option, last, its value attached or next.
        for (i, c) in cluster.char_indices() {
            if FLAGS.contains(c) {
                out.push(format!("-{c}"));
                continue;
            }
            if WITH_VALUE.contains(c) {
                let rest = &cluster[i + c.len_utf8()..];
                let value = if rest.is_empty() {
                    value_of(&format!("-{c}"), None, words.next())?
                } else {
                    rest.to_string()
                };
                if c == 'c' {
                    check_command(&value)?;
                    commands += 1;
                }
                if c == 'v' {
                    check_variable(&value)?;
                }
                out.push(format!("-{c}"));
                out.push(value);
                break;
            }
            let name = format!("-{c}");
            let why = not_allowed_why(&name);
            return Err(refuse(name, why));
        }
    }
    if commands == 0 {
        return Err(refuse(
            "the command",
            "has no -c \"SQL\"; a psql op runs the SQL it is given and reads nothing else",
        ));
    }
    Ok(out)
}

fn not_allowed_why(option: &str) -> &'static str {
    match option {
        "-h" | "--host" | "-p" | "--port" | "-U" | "--username" | "-d" | "--dbname" | "-w" | "--no-password" | "-W"
        | "--password" => "chooses the connection; a psql op connects where the appliance says, as a role made for the op",
        "-f" | "--file" | "-o" | "--output" | "-L" | "--log-file" => {
            "reads or writes a file (or pipes to a program) inside the appliance"
        }
        _ => "is not among the options a psql op may use",
    }
}

/// A `-v NAME=VALUE`: prompts may run commands (`%`…``) and are refused, whatever psql does
/// with them without a terminal.
fn check_variable(assignment: &str) -> Result<(), PsqlRefusal> {
    let name = assignment.split('=').next().unwrap_or_default();
    if name.to_ascii_uppercase().starts_with("PROMPT") || assignment.contains('`') {
        return Err(refuse(
            format!("-v {name}"),
            "sets a prompt or holds a backquote, which can run a command",
        ));
    }
    Ok(())
}

/// One `-c` string: SQL (no `COPY … PROGRAM`), or a describe meta-command with plain patterns.
pub fn check_command(text: &str) -> Result<(), PsqlRefusal> {
    if let Some(meta) = text.strip_prefix('\\') {
        return check_meta(meta);
    }
    if copy_program(text) {
        return Err(refuse(
            "COPY … PROGRAM",
            "runs a program on the database server",
        ));
    }
    Ok(())
}

fn check_meta(meta: &str) -> Result<(), PsqlRefusal> {
    let mut parts = meta.split_ascii_whitespace();
    let name = parts.next().unwrap_or_default();
    let shown = format!("\\{}", name.chars().take(32).collect::<String>());
    let why_named = match name {
        n if n.starts_with('!') => Some("runs a shell command inside the appliance"),
        "copy" => Some("reads or writes appliance files or runs a program (\\copy … program)"),
        "o" | "out" | "g" | "gx" | "w" | "write" => {
            Some("writes to an appliance file or pipes to a program")
        }
        "i" | "include" | "ir" | "include_relative" => Some("reads an appliance file"),
        "setenv" => Some("changes the environment of what psql runs"),
        "c" | "connect" => Some("chooses another connection"),
        "e" | "edit" | "ef" | "ev" => Some("runs an editor"),
        "lo_import" | "lo_export" => Some("reads or writes an appliance file"),
        _ => None,
    };
    if let Some(why) = why_named {
        return Err(refuse(shown, why));
    }
    if !DESCRIBES.contains(&name) {
        return Err(refuse(shown, "is a meta-command a psql op may not use (only describes such as \\d, \\l, \\dn, \\conninfo)"));
    }
    // Backquotes run commands, `:` interpolates, a backslash starts another meta-command.
    for arg in parts {
        if !arg
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '*' | '?' | '"' | '$' | '+'))
        {
            return Err(refuse(
                format!("{shown} {}", arg.chars().take(64).collect::<String>()),
                "has an argument that is not a plain name pattern",
            ));
        }
    }
    Ok(())
}

/// `COPY … PROGRAM` anywhere in the SQL, outside literals, quoted identifiers and comments,
/// whether or not the server treats backslashes in plain literals as escapes
/// (`standard_conforming_strings`): either reading finding it is enough.
fn copy_program(sql: &str) -> bool {
    [true, false]
        .into_iter()
        .any(|standard| has_copy_program(&sql_words(sql, standard)))
}

fn has_copy_program(words: &[String]) -> bool {
    let mut seen_copy = false;
    for word in words {
        if word.eq_ignore_ascii_case("copy") {
            seen_copy = true;
        } else if seen_copy && word.eq_ignore_ascii_case("program") {
            return true;
        }
    }
    false
}

/// The bare words of SQL text: string literals (including E'' and $tag$…$tag$), quoted
/// identifiers and comments are skipped. `standard`: a backslash escapes only in E'…'.
fn sql_words(sql: &str, standard: bool) -> Vec<String> {
    let chars: Vec<char> = sql.chars().collect();
    let (mut words, mut cur, mut i) = (Vec::new(), String::new(), 0);
    let flush = |cur: &mut String, words: &mut Vec<String>| {
        if !cur.is_empty() {
            words.push(std::mem::take(cur));
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '\'' | '"' => {
                let escapes = c == '\'' && (!standard || cur.eq_ignore_ascii_case("e"));
                flush(&mut cur, &mut words);
                i += 1;
                while i < chars.len() {
                    if chars[i] == c {
                        if chars.get(i + 1) == Some(&c) {
                            i += 1;
                        } else {
                            break;
                        }
                    } else if chars[i] == '\\' && escapes {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '-' if next == Some('-') => {
                flush(&mut cur, &mut words);
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                flush(&mut cur, &mut words);
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 1;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    i += 1;
                }
            }
            '$' if cur.is_empty() => {
                // $tag$ … $tag$ (a `$1` parameter has a digit first and no closing `$`).
                let tag_len = chars[i + 1..].iter().position(|c| *c == '$');
                match tag_len {
                    Some(n)
                        if chars[i + 1..i + 1 + n]
                            .iter()
                            .all(|c| c.is_alphanumeric() || *c == '_')
                            && !chars.get(i + 1).is_some_and(|c| c.is_ascii_digit()) =>
                    {
                        let tag: String = chars[i..i + n + 2].iter().collect();
                        let body_start = i + n + 2;
                        let rest: String = chars[body_start.min(chars.len())..].iter().collect();
                        match rest.find(&tag) {
                            Some(end) => {
                                i = body_start + rest[..end].chars().count() + tag.chars().count()
                                    - 1
                            }
                            None => i = chars.len(),
                        }
                    }
                    _ => cur.push(c),
                }
            }
            c if c.is_alphanumeric() || c == '_' || c == '$' => cur.push(c),
            _ => flush(&mut cur, &mut words),
        }
        i += 1;
    }
    flush(&mut cur, &mut words);
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        std::iter::once("psql")
            .chain(words.iter().copied())
            .map(String::from)
            .collect()
    }

    #[test]
    fn sql_and_formatting_options_pass_with_no_psqlrc() {
        for (words, want) in [
            (
                &["-X", "-At", "-c", "SELECT 1"][..],
                &["psql", "-X", "-X", "-A", "-t", "-c", "SELECT 1"][..],
            ),
            (&["-cSELECT 1"], &["psql", "-X", "-c", "SELECT 1"]),
            (
                &["--command=SELECT 1", "--csv"],
                &["psql", "-X", "--command=SELECT 1", "--csv"],
            ),
            (
                &["--command", "SELECT 1", "-v", "ON_ERROR_STOP=1", "-F", ","],
                &[
                    "psql",
                    "-X",
                    "--command=SELECT 1",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-F",
                    ",",
                ],
            ),
            (
                &["-xc", "\\dt public.*"],
                &["psql", "-X", "-x", "-c", "\\dt public.*"],
            ),
            (&["-c", "\\conninfo"], &["psql", "-X", "-c", "\\conninfo"]),
            (
                &["-c", "SELECT 'copy to program' AS x -- program"],
                &[
                    "psql",
                    "-X",
                    "-c",
                    "SELECT 'copy to program' AS x -- program",
                ],
            ),
        ] {
            assert_eq!(
                check(&argv(words)).unwrap_or_else(|e| panic!("{words:?}: {e}")),
                want,
                "{words:?}"
            );
        }
    }

    #[test]
    fn escapes_to_the_appliance_are_refused() {
        for (words, what) in [
            (&["-c", "\\! sh -c id"][..], "\\!"),
            (&["-c", "\\!id"], "\\!id"),
            (&["-c", "\\copy t to program 'sh'"], "\\copy"),
            (&["-c", "\\copy t from '/etc/postern/agent.key'"], "\\copy"),
            (&["-c", "\\o |sh"], "\\o"),
            (&["-c", "\\o /tmp/x"], "\\o"),
            (&["-c", "\\g |sh"], "\\g"),
            (&["-c", "\\w /tmp/x"], "\\w"),
            (&["-c", "\\i /etc/postern/agent.toml"], "\\i"),
            (&["-c", "\\ir x.sql"], "\\ir"),
            (&["-c", "\\setenv PAGER sh"], "\\setenv"),
            (&["-c", "\\c other"], "\\c"),
            (&["-c", "\\set x `id`"], "\\set"),
            (&["-c", "\\d `id`"], "\\d `id`"),
            (&["-c", "\\dt :x"], "\\dt :x"),
            (&["-c", "COPY t TO PROGRAM 'sh -c id'"], "COPY … PROGRAM"),
            (
                &["-c", "copy (select 1) to\nprogram $$id$$"],
                "COPY … PROGRAM",
            ),
            (&["-f", "/etc/postern/agent.toml"], "-f"),
            (&["-c", "select 1", "-o", "|sh"], "-o"),
            (&["-c", "select 1", "-L", "/tmp/log"], "-L"),
            (&["-h", "evil.example", "-c", "select 1"], "-h"),
            (&["-Atdpostgres", "-c", "select 1"], "-d"),
            (&["-U", "postgres", "-c", "select 1"], "-U"),
            (&["--host=evil", "-c", "select 1"], "--host"),
            (&["--dbname", "x", "-c", "select 1"], "--dbname"),
            (&["-c", "select 1", "service=admin"], "service=admin"),
            (
                &["-c", "select 1", "postgres://evil/db"],
                "postgres://evil/db",
            ),
            (&["-c", "select 1", "--", "db"], "--"),
            (&["-At"], "the command"),
            (&["-c"], "-c"),
            (&["-v", "PROMPT1=%`id`", "-c", "select 1"], "-v PROMPT1"),
            (&["--set=x=`id`", "-c", "select 1"], "-v x"),
        ] {
            let e = check(&argv(words)).expect_err(&format!("{words:?}"));
            assert_eq!(e.what, what, "{words:?}: {e}");
            let api = e.to_api_error();
            assert_eq!(api.code, ErrorCode::ForbiddenByScope);
            assert!(api.hint.contains("-c"), "{api}");
        }
    }

    #[test]
    fn sql_words_skip_literals_identifiers_and_comments() {
        assert_eq!(
            sql_words(
                "SELECT 'COPY x PROGRAM', \"program\" /* copy /* program */ */ FROM t",
                true
            ),
            ["SELECT", "FROM", "t"]
        );
        assert_eq!(
            sql_words("select $q$ copy program $q$, $1", true),
            ["select", "$1"]
        );
        assert_eq!(
            sql_words("select E'it\\'s copy' program", true),
            ["select", "E", "program"]
        );
        // A backslash ends no standard literal: the COPY after it is seen either way.
        assert!(copy_program("SELECT 'a\\' ; COPY t TO PROGRAM 'id' ; --'"));
        assert!(!copy_program("SELECT 'copy' , program FROM t"));
        assert!(copy_program("Copy t FROM PROGRAM 'x'"));
    }
}
