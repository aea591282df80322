use super::*;

fn scope(privs: &[&str]) -> Scope {
    Scope {
        database: "app db".into(),
        schemas: vec!["app".into(), "we\"ird".into()],
        privileges: privs.iter().map(|s| s.to_string()).collect(),
        owner_role: None,
    }
}

#[test]
fn quoting() {
    assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    assert_eq!(quote_literal("it's").as_deref(), Some("'it''s'"));
    assert_eq!(quote_literal("a\\b"), None);
    assert_eq!(role_name("ep_7F3A-x"), "postern_ep_7f3a_x");
    assert_eq!(role_name(&"x".repeat(100)).len(), 63);
}

#[test]
fn statements_grant_exactly_the_scope() {
    let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    let s = create_statements(
        "postern_ep_1",
        &scope(&["SELECT", "INSERT"]),
        at,
        "SCRAM-SHA-256$4096:x$y:z",
    )
    .unwrap();
    assert_eq!(
        s,
        [
            "CREATE ROLE \"postern_ep_1\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS \
             CONNECTION LIMIT 64 VALID UNTIL '2026-01-01T00:00:00Z' PASSWORD 'SCRAM-SHA-256$4096:x$y:z'",
            "GRANT CONNECT ON DATABASE \"app db\" TO \"postern_ep_1\"",
            "GRANT USAGE ON SCHEMA \"app\" TO \"postern_ep_1\"",
            "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA \"app\" TO \"postern_ep_1\"",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"app\" TO \"postern_ep_1\"",
            "GRANT USAGE ON SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
            "GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
            "GRANT USAGE ON ALL SEQUENCES IN SCHEMA \"we\"\"ird\" TO \"postern_ep_1\"",
            "ALTER ROLE \"postern_ep_1\" SET search_path = \"app\", \"we\"\"ird\"",
        ]
    );
    let read_only = create_statements("r", &scope(&["SELECT"]), at, "v").unwrap();
    assert!(!read_only.iter().any(|s| s.contains("SEQUENCES")));
}

#[test]
fn create_is_granted_on_the_scope_only_with_an_owner() {
    let at: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    let owned = Scope {
        owner_role: Some("app_owner".into()),
        ..scope(&["SELECT", "CREATE"])
    };
    let s = create_statements("r", &owned, at, "v").unwrap();
    assert!(
        s.contains(&"GRANT CREATE ON SCHEMA \"app\" TO \"r\"".to_string()),
        "{s:?}"
    );
    assert!(
        s.contains(&"GRANT SELECT ON ALL TABLES IN SCHEMA \"app\" TO \"r\"".to_string()),
        "{s:?}"
    );
    assert_eq!(owned.create_schemas(), ["app", "we\"ird"]);
    let only_create = create_statements(
        "r",
        &Scope {
            privileges: vec!["CREATE".into()],
            ..owned.clone()
        },
        at,
        "v",
    )
    .unwrap();
    assert!(
        !only_create.iter().any(|s| s.contains("ON ALL TABLES")),
        "{only_create:?}"
    );
    let plain = create_statements("r", &scope(&["SELECT", "INSERT"]), at, "v").unwrap();
    assert!(!plain.iter().any(|s| s.contains("CREATE ON")), "{plain:?}");
    assert!(scope(&["SELECT"]).create_schemas().is_empty());
}

#[test]
fn owners_with_powers_are_refused() {
    let ok = OwnerAttributes::default();
    assert_eq!(owner_refusal("o", Some(&ok)), None);
    assert!(owner_refusal("o", None).is_some_and(|m| m.contains("does not exist")));
    for (a, word) in [
        (
            OwnerAttributes {
                superuser: true,
                ..ok.clone()
            },
            "SUPERUSER",
        ),
        (
            OwnerAttributes {
                createrole: true,
                ..ok.clone()
            },
            "CREATEROLE",
        ),
        (
            OwnerAttributes {
                createdb: true,
                ..ok.clone()
            },
            "CREATEDB",
        ),
        (
            OwnerAttributes {
                bypassrls: true,
                ..ok.clone()
            },
            "BYPASSRLS",
        ),
        (
            OwnerAttributes {
                replication: true,
                ..ok.clone()
            },
            "REPLICATION",
        ),
        (
            OwnerAttributes {
                server_access: vec!["pg_read_server_files".into()],
                ..ok.clone()
            },
            "has pg_read_server_files",
        ),
    ] {
        let m = owner_refusal("o", Some(&a)).unwrap_or_default();
        assert!(m.contains(word) && m.contains("\"o\""), "{a:?}: {m}");
    }
}

#[test]
fn create_outside_the_scope_is_refused() {
    let v = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(outside_scope_refusal("r", &[], &[], false), None);
    assert_eq!(
        outside_scope_refusal("r", &v(&["app"]), &v(&["app"]), false),
        None
    );
    let m =
        outside_scope_refusal("r", &v(&["app", "public"]), &v(&["app"]), false).unwrap_or_default();
    assert!(
        m.contains("\"public\"") && m.contains("REVOKE CREATE ON SCHEMA \"public\" FROM PUBLIC"),
        "{m}"
    );
    assert!(
        outside_scope_refusal("r", &v(&["app"]), &[], false).is_some(),
        "CREATE in scope without owner_role"
    );
    assert!(
        outside_scope_refusal("r", &[], &[], true).is_some_and(|m| m.contains("create schemas"))
    );
}

#[test]
fn scope_validation() {
    let cases: Vec<(Scope, bool)> = vec![
        (scope(&["SELECT"]), true),
        (scope(&["SELECT", "DELETE"]), true),
        (scope(&["ALL"]), false),
        (scope(&["SELECT; DROP TABLE x"]), false),
        (scope(&[]), false),
        (
            Scope {
                schemas: vec![],
                ..scope(&["SELECT"])
            },
            false,
        ),
        (
            Scope {
                database: " ".into(),
                ..scope(&["SELECT"])
            },
            false,
        ),
        (scope(&["SELECT", "CREATE"]), false),
        (
            Scope {
                owner_role: Some("app_owner".into()),
                ..scope(&["SELECT", "CREATE"])
            },
            true,
        ),
        (
            Scope {
                owner_role: Some("app_owner".into()),
                ..scope(&["CREATE"])
            },
            true,
        ),
        (
            Scope {
                owner_role: Some("app_owner".into()),
                ..scope(&["SELECT"])
            },
            true,
        ),
        (
            Scope {
                owner_role: Some(" ".into()),
                ..scope(&["SELECT"])
            },
            false,
        ),
        (
            Scope {
                owner_role: Some("pg_write_server_files".into()),
                ..scope(&["SELECT"])
            },
            false,
        ),
        (
            Scope {
                owner_role: Some("postern_ep_1".into()),
                ..scope(&["SELECT"])
            },
            false,
        ),
        (
            Scope {
                owner_role: Some("PUBLIC".into()),
                ..scope(&["SELECT"])
            },
            false,
        ),
    ];
    for (s, ok) in cases {
        assert_eq!(s.validate().is_ok(), ok, "{s:?}");
    }
}
