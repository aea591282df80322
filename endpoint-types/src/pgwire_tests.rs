use super::*;
use bytes::BytesMut;
use postgres_protocol::message::frontend;
use proptest::prelude::*;

fn built(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut b = BytesMut::new();
    f(&mut b);
    b.to_vec()
}

fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn startup_packets_from_a_real_client_library() {
    let startup =
        built(|b| frontend::startup_message([("user", "ep_1"), ("database", "appdb")], b).unwrap());
    let ssl = built(frontend::ssl_request);
    let cancel = built(|b| frontend::cancel_request(42, -7, b));
    let cases: Vec<(&str, Vec<u8>, Startup)> = vec![
        (
            "startup",
            startup,
            Startup::Params {
                minor: 0,
                params: params(&[("user", "ep_1"), ("database", "appdb")]),
            },
        ),
        ("ssl", ssl, Startup::Ssl),
        (
            "cancel",
            cancel,
            Startup::Cancel(CancelKey {
                process_id: 42,
                secret: -7,
            }),
        ),
        (
            "gssenc",
            vec![0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30],
            Startup::GssEnc,
        ),
        (
            "minor 2",
            vec![0, 0, 0, 9, 0, 3, 0, 2, 0],
            Startup::Params {
                minor: 2,
                params: vec![],
            },
        ),
    ];
    for (name, bytes, want) in cases {
        // Every prefix is incomplete, the whole is the packet, and what follows is left alone.
        for cut in 0..bytes.len() {
            assert_eq!(
                parse_startup(&bytes[..cut]),
                Ok(None),
                "{name} cut at {cut}"
            );
        }
        let mut more = bytes.clone();
        more.extend_from_slice(b"next");
        assert_eq!(
            parse_startup(&more),
            Ok(Some((want, bytes.len()))),
            "{name}"
        );
    }
}

#[test]
fn bad_startup_packets_are_errors_before_buffering() {
    let cases: Vec<(&str, Vec<u8>, WireError)> = vec![
        (
            "huge",
            vec![0x7f, 0, 0, 0],
            WireError::TooLarge {
                len: 0x7f00_0000,
                limit: MAX_STARTUP_LEN,
            },
        ),
        (
            "negative",
            vec![0xff, 0xff, 0xff, 0xff],
            WireError::BadLength(-1),
        ),
        (
            "too short",
            vec![0, 0, 0, 4, 0, 0, 0, 0],
            WireError::BadLength(4),
        ),
        (
            "protocol 2",
            vec![0, 0, 0, 8, 0, 2, 0, 0],
            WireError::Version { major: 2, minor: 0 },
        ),
        (
            "ssl with body",
            vec![0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0],
            WireError::Malformed("SSLRequest"),
        ),
        (
            "unterminated",
            vec![0, 0, 0, 10, 0, 3, 0, 0, b'u', b'x'],
            WireError::Malformed("StartupMessage"),
        ),
        (
            "trailing",
            vec![0, 0, 0, 11, 0, 3, 0, 0, 0, b'x', 0],
            WireError::Malformed("StartupMessage"),
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(parse_startup(&bytes), Err(want), "{name}");
    }
}

#[test]
fn frontend_messages_from_a_real_client_library_are_seen_by_the_audit() {
    let mut wire = BytesMut::new();
    frontend::query("select 'it''s'; -- \u{1F600}", &mut wire).unwrap();
    frontend::parse("s1", "select $1::int + $2", [23, 23], &mut wire).unwrap();
    frontend::bind(
        "p1",
        "s1",
        [1],
        [1, 2],
        |v: i32, buf: &mut BytesMut| {
            buf.extend_from_slice(&v.to_be_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        [1],
        &mut wire,
    )
    .map_err(|_| "bind")
    .unwrap();
    frontend::describe(b'P', "p1", &mut wire).unwrap();
    frontend::execute("p1", 0, &mut wire).unwrap();
    frontend::sync(&mut wire);
    frontend::CopyData::new(&b"1\t2\n"[..])
        .unwrap()
        .write(&mut wire);
    frontend::terminate(&mut wire);
    let want = vec![
        Frontend::Query {
            text: "select 'it''s'; -- \u{1F600}".into(),
        },
        Frontend::Parse {
            statement: "s1".into(),
            text: "select $1::int + $2".into(),
            param_types: 2,
        },
        Frontend::Bind {
            portal: "p1".into(),
            statement: "s1".into(),
            params: 2,
        },
        Frontend::Execute {
            portal: "p1".into(),
            max_rows: 0,
        },
        Frontend::Terminate,
    ];
    // Whole, and in every two-piece split: the same messages, and everything forwarded.
    for cut in 0..=wire.len() {
        let mut scan = FrontendScan::new(1024);
        let mut seen = Vec::new();
        let mut forwarded = 0;
        let mut pending: Vec<u8> = Vec::new();
        for piece in [&wire[..cut], &wire[cut..]] {
            pending.extend_from_slice(piece);
            let mut out = Vec::new();
            let n = scan.scan(&pending, &mut out).unwrap();
            seen.extend(out.into_iter().map(owned));
            forwarded += n;
            pending.drain(..n);
        }
        assert_eq!(forwarded, wire.len(), "cut {cut}");
        assert_eq!(seen, want, "cut {cut}");
    }
}

fn owned(f: Frontend<'_>) -> Frontend<'static> {
    let o = |c: std::borrow::Cow<'_, str>| std::borrow::Cow::Owned(c.into_owned());
    match f {
        Frontend::Query { text } => Frontend::Query { text: o(text) },
        Frontend::Parse {
            statement,
            text,
            param_types,
        } => Frontend::Parse {
            statement: o(statement),
            text: o(text),
            param_types,
        },
        Frontend::Bind {
            portal,
            statement,
            params,
        } => Frontend::Bind {
            portal: o(portal),
            statement: o(statement),
            params,
        },
        Frontend::Execute { portal, max_rows } => Frontend::Execute {
            portal: o(portal),
            max_rows,
        },
        Frontend::FunctionCall { function_oid, args } => {
            Frontend::FunctionCall { function_oid, args }
        }
        Frontend::Terminate => Frontend::Terminate,
    }
}

/// libpq's `PQfn` as `lo_write` sends it: `lowrite(fd int4, data bytea)`, binary arguments.
fn function_call_lowrite(fd: i32, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&955u32.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    body.extend_from_slice(&4i32.to_be_bytes());
    body.extend_from_slice(&fd.to_be_bytes());
    body.extend_from_slice(&(data.len() as i32).to_be_bytes());
    body.extend_from_slice(data);
    body.extend_from_slice(&1i16.to_be_bytes());
    let mut wire = vec![b'F'];
    wire.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
    wire.extend_from_slice(&body);
    wire
}

#[test]
fn fastpath_function_calls_are_audited_without_their_arguments() {
    let mut wire = function_call_lowrite(0, b"secret bytes");
    wire.extend_from_slice(&built(frontend::sync));
    let mut scan = FrontendScan::new(1024);
    let mut seen = Vec::new();
    assert_eq!(scan.scan(&wire, &mut seen), Ok(wire.len()));
    assert_eq!(
        seen,
        [Frontend::FunctionCall {
            function_oid: 955,
            args: 2
        }]
    );
    let detail = seen[0].audit_detail_json().unwrap().get().to_string();
    assert_eq!(
        detail,
        r#"{"args":2,"function_oid":955,"message":"function_call","protocol":"fastpath"}"#
    );
    assert!(!detail.contains("secret"));
    // Held whole for the audit, so bounded by the audit limit like a Query.
    let big = function_call_lowrite(0, &[0u8; 2048]);
    assert!(matches!(
        FrontendScan::new(1024).scan(&big, &mut Vec::new()),
        Err(WireError::TooLarge { .. })
    ));
}

#[test]
fn copy_data_streams_through_without_being_held() {
    // A 1 MiB CopyData message with a 1 KiB audit limit: forwarded piece by piece.
    let mut wire = BytesMut::new();
    frontend::CopyData::new(&vec![b'x'; 1 << 20][..])
        .unwrap()
        .write(&mut wire);
    frontend::copy_done(&mut wire);
    let mut scan = FrontendScan::new(1024);
    let mut out = Vec::new();
    assert_eq!(scan.scan(&wire[..3], &mut out), Ok(0), "header incomplete");
    assert_eq!(scan.scan(&wire[..4096], &mut out), Ok(4096));
    assert_eq!(scan.scan(&wire[4096..], &mut out), Ok(wire.len() - 4096));
    assert!(out.is_empty());
}

#[test]
fn audited_message_over_the_limit_is_refused_before_it_is_buffered() {
    let mut wire = BytesMut::new();
    frontend::query(&"x".repeat(2000), &mut wire).unwrap();
    let mut out = Vec::new();
    assert_eq!(
        FrontendScan::new(1024).scan(&wire[..5], &mut out),
        Err(WireError::TooLarge {
            len: 2005,
            limit: 1028
        })
    );
}

#[test]
fn malformed_audited_messages_are_errors() {
    let cases: Vec<(&str, u8, Vec<u8>)> = vec![
        ("query without nul", b'Q', b"select".to_vec()),
        (
            "parse short types",
            b'P',
            b"\0select 1\0\0\x02\0\0\0\x17".to_vec(),
        ),
        ("bind negative count", b'B', b"\0\0\0\0\xff\xff".to_vec()),
        (
            "bind value past end",
            b'B',
            b"\0\0\0\0\0\x01\0\0\0\x09ab".to_vec(),
        ),
        ("execute short", b'E', b"\0\0\0".to_vec()),
        ("function call short", b'F', b"\0\0\x03".to_vec()),
        (
            "function call arg past end",
            b'F',
            b"\0\0\x03\xbb\0\0\0\x01\0\0\0\x09ab\0\x01".to_vec(),
        ),
        (
            "function call no result format",
            b'F',
            b"\0\0\x03\xbb\0\0\0\0".to_vec(),
        ),
        (
            "function call trailing bytes",
            b'F',
            b"\0\0\x03\xbb\0\0\0\0\0\x01!".to_vec(),
        ),
    ];
    for (name, tag, body) in cases {
        assert!(frontend_view(tag, &body).is_err(), "{name}");
    }
    assert_eq!(frontend_view(b'S', b""), Ok(None));
}

#[test]
fn sasl_initial_response_from_a_real_client_library() {
    let wire =
        built(|b| frontend::sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", b).unwrap());
    let (tag, body, n) = parse_message(&wire, MAX_AUTH_MESSAGE_LEN).unwrap().unwrap();
    assert_eq!((tag, n), (b'p', wire.len()));
    assert_eq!(
        parse_sasl_initial(body).unwrap(),
        ("SCRAM-SHA-256", &b"n,,n=,r=abc"[..])
    );
    assert!(parse_sasl_initial(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
}

#[test]
fn backend_messages_parse_with_a_real_client_library() {
    use postgres_protocol::message::backend::Message;
    let mut b = BytesMut::new();
    auth_sasl(&mut b, &["SCRAM-SHA-256"]);
    auth_sasl_continue(&mut b, b"r=x,s=y,i=4096");
    auth_sasl_final(&mut b, b"v=abc");
    auth_ok(&mut b);
    backend_key_data(
        &mut b,
        CancelKey {
            process_id: 7,
            secret: 9,
        },
    );
    PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        "password authentication failed for user \"ep_1\"",
    )
    .hint("h")
    .write(&mut b);
    let mut kinds = Vec::new();
    while let Some(m) = Message::parse(&mut b).unwrap() {
        kinds.push(match m {
            Message::AuthenticationSasl(_) => "sasl",
            Message::AuthenticationSaslContinue(c) => {
                assert_eq!(c.data(), b"r=x,s=y,i=4096");
                "continue"
            }
            Message::AuthenticationSaslFinal(f) => {
                assert_eq!(f.data(), b"v=abc");
                "final"
            }
            Message::AuthenticationOk => "ok",
            Message::BackendKeyData(k) => {
                assert_eq!((k.process_id(), k.secret_key()), (7, 9));
                "key"
            }
            Message::ErrorResponse(_) => "error",
            _ => "other",
        });
    }
    assert_eq!(kinds, ["sasl", "continue", "final", "ok", "key", "error"]);
    let mut e = BytesMut::new();
    PgError::fatal("28P01", "nope").write(&mut e);
    assert_eq!(
        error_fields(&e[5..]),
        ("28P01".to_string(), "nope".to_string())
    );
}

#[test]
fn cancel_key_param_round_trips_and_hides_the_secret() {
    let k = CancelKey {
        process_id: -5,
        secret: 123456,
    };
    assert_eq!(CancelKey::from_param(&k.to_param()), Some(k));
    assert_eq!(CancelKey::from_param("1"), None);
    assert!(!format!("{k:?}").contains("123456"));
}

#[test]
fn startup_message_round_trips() {
    let p = params(&[
        ("user", "r"),
        ("database", "d"),
        ("application_name", "psql"),
    ]);
    let b = built(|b| startup_message(b, &p));
    assert_eq!(
        parse_startup(&b),
        Ok(Some((
            Startup::Params {
                minor: 0,
                params: p
            },
            b.len()
        )))
    );
    let c = built(|b| {
        cancel_request(
            b,
            CancelKey {
                process_id: 1,
                secret: 2,
            },
        )
    });
    assert_eq!(
        parse_startup(&c),
        Ok(Some((
            Startup::Cancel(CancelKey {
                process_id: 1,
                secret: 2
            }),
            16
        )))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn startup_parser_never_panics_and_never_overreads(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(Some((_, n))) = parse_startup(&bytes) {
            prop_assert!(n <= bytes.len() && n >= 8);
        }
    }

    #[test]
    fn message_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64), limit in 0usize..64) {
        if let Ok(Some((_, body, n))) = parse_message(&bytes, limit) {
            prop_assert!(n <= bytes.len() && body.len() + 5 == n && body.len() <= limit);
        }
        let _ = parse_sasl_initial(&bytes);
        for tag in [b'Q', b'P', b'B', b'E', b'X'] {
            let _ = frontend_view(tag, &bytes);
        }
        let _ = error_fields(&bytes);
    }

    /// Arbitrary bytes in arbitrary pieces: no panic, everything forwarded is a prefix of what
    /// arrived, and what stays buffered never exceeds one audited message at the limit.
    #[test]
    fn scanner_never_buffers_past_the_limit(
        pieces in proptest::collection::vec(proptest::collection::vec(
            prop_oneof![Just(b'Q'), Just(b'P'), Just(b'd'), Just(0u8), any::<u8>()], 0..40), 0..8),
        limit in 0usize..48,
    ) {
        let mut scan = FrontendScan::new(limit);
        let mut pending = Vec::new();
        for p in pieces {
            pending.extend_from_slice(&p);
            let mut out = Vec::new();
            match scan.scan(&pending, &mut out) {
                Ok(n) => {
                    prop_assert!(n <= pending.len());
                    pending.drain(..n);
                    prop_assert!(pending.len() <= limit + 5, "holding {} with limit {}", pending.len(), limit);
                }
                Err(_) => break,
            }
        }
    }
}

/// The detail as a `Value`: what a trail re-read from storage holds.
fn value_form(f: &Frontend<'_>) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match f {
        Frontend::Query { text } => {
            let (t, truncated) = capped(text);
            json!({ "protocol": "simple", "message": "query", "text": t, "truncated": truncated })
        }
        Frontend::Parse {
            statement,
            text,
            param_types,
        } => {
            let (t, truncated) = capped(text);
            json!({ "protocol": "extended", "message": "parse", "statement": statement, "text": t,
                    "param_types": param_types, "truncated": truncated })
        }
        Frontend::Bind {
            portal,
            statement,
            params,
        } => {
            json!({ "protocol": "extended", "message": "bind", "portal": portal, "statement": statement, "params": params })
        }
        Frontend::Execute { portal, max_rows } => {
            json!({ "protocol": "extended", "message": "execute", "portal": portal, "max_rows": max_rows })
        }
        Frontend::FunctionCall { function_oid, args } => {
            json!({ "protocol": "fastpath", "message": "function_call", "function_oid": function_oid, "args": args })
        }
        Frontend::Terminate => return None,
    })
}

/// The JSON text written on the message path is exactly the `Value` form's serialisation, so
/// a trail re-read from storage hashes to the same chain.
fn assert_same_detail(f: &Frontend<'_>) {
    let raw = f.audit_detail_json().map(|r| r.get().to_string());
    let value = value_form(f).map(|v| v.to_string());
    assert_eq!(raw, value, "{f:?}");
    if let Some(text) = raw {
        let reparsed: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(reparsed.to_string(), text, "canonical after a round trip");
    }
}

#[test]
fn statement_detail_json_matches_the_value_form() {
    let long = "x".repeat(MAX_AUDITED_TEXT + 10);
    for f in [
        Frontend::Query {
            text: "select 1".into(),
        },
        Frontend::Query {
            text: "select '\u{1b}[2J\"\\'\n\t\u{0}'".into(),
        },
        Frontend::Query {
            text: long.as_str().into(),
        },
        Frontend::Parse {
            statement: "s1".into(),
            text: "select $1::int".into(),
            param_types: 1,
        },
        Frontend::Parse {
            statement: "".into(),
            text: long.as_str().into(),
            param_types: 0,
        },
        Frontend::Bind {
            portal: "".into(),
            statement: "s1".into(),
            params: 3,
        },
        Frontend::Execute {
            portal: "p\"1".into(),
            max_rows: -1,
        },
        Frontend::Execute {
            portal: "".into(),
            max_rows: i32::MAX,
        },
        Frontend::FunctionCall {
            function_oid: 955,
            args: 2,
        },
        Frontend::FunctionCall {
            function_oid: u32::MAX,
            args: 0,
        },
        Frontend::Terminate,
    ] {
        assert_same_detail(&f);
    }
}

proptest! {
    #[test]
    fn statement_detail_json_matches_for_any_text(text in ".*", name in ".{0,8}", n in any::<u16>(), rows in any::<i32>()) {
        assert_same_detail(&Frontend::Query { text: text.as_str().into() });
        assert_same_detail(&Frontend::Parse { statement: name.as_str().into(), text: text.as_str().into(), param_types: n.into() });
        assert_same_detail(&Frontend::Bind { portal: name.as_str().into(), statement: text.as_str().into(), params: n.into() });
        assert_same_detail(&Frontend::Execute { portal: text.as_str().into(), max_rows: rows });
    }
}
