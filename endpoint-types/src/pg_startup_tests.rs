use super::*;
use proptest::prelude::*;

fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn startup_policy() {
    let ok = |p: &[(&str, &str)]| sanitize(&params(p), "appdb");
    let refused = |p: &[(&str, &str)]| ok(p).map(|_| ()).unwrap_err();
    let s = ok(&[
        ("user", "ep_1"),
        ("database", "appdb"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("extra_float_digits", "3"),
        (
            "options",
            "-c statement_timeout=5s --lock-timeout=1s -cIntervalStyle=iso_8601",
        ),
        ("replication", "false"),
        ("postern.cancel_key", "1.2"),
        ("_pq_.compression", "on"),
    ])
    .unwrap();
    assert_eq!(
        s.forward,
        params(&[
            ("application_name", "psql"),
            ("client_encoding", "UTF8"),
            ("DateStyle", "ISO, MDY"),
            ("TimeZone", "UTC"),
            ("extra_float_digits", "3"),
            (
                "options",
                "-c statement_timeout=5s --lock-timeout=1s -cIntervalStyle=iso_8601"
            ),
        ])
    );
    assert_eq!(s.stripped, ["replication", "postern.cancel_key"]);
    assert_eq!(s.protocol_options, ["_pq_.compression"]);
    assert!(
        ok(&[("user", "ep_1")]).is_ok(),
        "no database means the endpoint's"
    );
    for bad in [
        &[("database", "postgres")][..],
        &[("replication", "database")],
        &[("replication", "true")],
        &[("role", "postgres")],
        &[("ROLE", "postgres")],
        &[("session_authorization", "postgres")],
        &[("search_path", "public")],
        &[("Search_Path", "public")],
        &[("work_mem", "1GB")],
        &[("custom.setting", "x")],
        &[("options", "-c role=postgres")],
        &[("options", "-crole=postgres")],
        &[("options", "-ecrole=postgres")],
        &[("options", "-e")],
        &[("options", "-d 5")],
        &[("options", "--role=postgres")],
        &[("options", "-c search_path=x")],
        &[(
            "options",
            "-c application_name=x -c Session-Authorization=postgres",
        )],
        &[("options", "-c\\ role=postgres")],
        &[("options", "-c application_name=x\x0b-crole=postgres")],
        &[("options", "-c application_name=x\u{a0}-crole=postgres")],
        &[("options", "-c")],
        &[("options", "-c application_name")],
        &[("options", "application_name=x")],
    ] {
        let e = refused(bad);
        assert_eq!(e.sqlstate, sqlstate::INSUFFICIENT_PRIVILEGE, "{bad:?}");
        assert_eq!(e.severity, "FATAL");
        assert!(
            e.hint
                .as_deref()
                .is_some_and(|h| h.contains("application_name")),
            "{e:?}"
        );
    }
    assert!(refused(&[("search_path", "x")])
        .message
        .contains("\"search_path\""));
    assert!(refused(&[("options", "-ecrole=x")])
        .message
        .contains("-ecrole=x"));
}

#[test]
fn options_split_like_the_server() {
    assert_eq!(
        split_options("  -c a=b\\ c   --x=y "),
        ["-c", "a=b c", "--x=y"]
    );
    assert_eq!(split_options("a\x0bb\tc"), ["a", "b", "c"]);
    assert_eq!(
        option_settings(
            "-c application_name=a -cTimeZone=UTC --extra-float-digits=3 -c DateStyle=ISO\\ DMY"
        ),
        Ok(vec![
            ("application_name".to_string(), "a".to_string()),
            ("TimeZone".to_string(), "UTC".to_string()),
            ("extra-float-digits".to_string(), "3".to_string()),
            ("DateStyle".to_string(), "ISO DMY".to_string()),
        ])
    );
}

/// The server's reading of `options`: `pg_split_opts` (C `isspace`, backslash escapes), then
/// `process_postgres_switches`' getopt. Returns every switch with the setting name it makes
/// (`c` and `-` set a GUC; any other switch is a flag of its own).
fn server_reading(options: &str) -> Vec<(char, Option<String>)> {
    let c_isspace = |c: char| matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r');
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            cur.extend(chars.next());
        } else if c_isspace(c) {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    const WITH_ARG: &str = "BcCDdfhkNprStvW-";
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(w) = words.get(i) {
        i += 1;
        let Some(flags) = w.strip_prefix('-') else {
            out.push(('?', None));
            continue;
        };
        let mut rest = flags.chars();
        while let Some(f) = rest.next() {
            if WITH_ARG.contains(f) {
                let tail: String = rest.collect();
                let arg = if tail.is_empty() {
                    let a = words.get(i).cloned();
                    i += 1;
                    a
                } else {
                    Some(tail)
                };
                let name = arg.map(|a| a.split_once('=').map(|(n, _)| n.to_string()).unwrap_or(a));
                out.push((f, name));
                break;
            }
            out.push((f, None));
        }
    }
    out
}

#[test]
fn the_server_model_reads_clusters() {
    assert_eq!(
        server_reading("-ecrole=x"),
        [('e', None), ('c', Some("role".into()))]
    );
    assert_eq!(
        server_reading("-c a=1 --b=2"),
        [('c', Some("a".into())), ('-', Some("b".into()))]
    );
}

fn interesting_options() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "-c",
        "-",
        "--",
        "c",
        "e",
        "d",
        " ",
        "\t",
        "\x0b",
        "\\",
        "=",
        "x",
        "role",
        "search_path",
        "application_name",
        "time-zone",
        "timezone",
        "session_authorization",
        "DateStyle",
        "-ce",
        "-ec",
        "\u{a0}",
    ]);
    prop::collection::vec(pieces, 0..12).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    /// Whatever `options` the policy lets through, the server reads only allowed settings from it.
    #[test]
    fn accepted_options_set_only_allowed_settings(options in interesting_options()) {
        if option_settings(&options).is_ok() {
            for (switch, name) in server_reading(&options) {
                prop_assert!(matches!(switch, 'c' | '-'), "{options:?} passes switch {switch}");
                let name = name.unwrap_or_default();
                prop_assert!(allowed_setting(&name), "{options:?} passes setting {name:?}");
            }
        }
    }

    #[test]
    fn allowed_settings_in_any_form_pass(
        picks in prop::collection::vec((prop::sample::select(ALLOWED_SETTINGS), 0..3usize, "[a-zA-Z0-9_, ]{1,8}"), 0..5),
    ) {
        let words: Vec<String> = picks.iter().map(|(name, form, value)| {
            let value = value.replace(' ', "\\ ");
            match form {
                0 => format!("-c {name}={value}"),
                1 => format!("-c{name}={value}"),
                _ => format!("--{}={value}", name.replace('_', "-")),
            }
        }).collect();
        let got = option_settings(&words.join(" "));
        prop_assert!(got.as_ref().is_ok_and(|s| s.len() == picks.len()), "{words:?}: {got:?}");
    }

    #[test]
    fn policy_never_panics(names in prop::collection::vec(".{0,12}", 0..4), values in prop::collection::vec(".{0,24}", 0..4)) {
        let p: Vec<(String, String)> = names.into_iter().zip(values).collect();
        let _ = sanitize(&p, "appdb");
    }
}
