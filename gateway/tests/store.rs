//! The store's contract, run against both backends: every test below exists as
//! `sqlite::NAME` (a database file in a temp dir) and `postgres::NAME` (its own database in a
//! throwaway PostgreSQL cluster the tests start; see `pg_cluster`).

use postern::pg_cluster;

use endpoint_types::{
    api::{verify_chain, AuditRecord, ClientCredential, EndpointState},
    control::{GrantLevel, GrantState, OpState, OpTool},
    resource::{EndpointType, PolicySummary},
    ApiError, ErrorCode,
};
use gateway::{
    audit::{sha256_hex, AuditLog, Subject},
    store::{
        ApplianceRow, AttemptRecord, AuditPageQuery, Backend, EndpointRow, EnrollmentRow,
        GrantChange, GrantMove, GrantRow, NewDelivery, OpRow, Store, TokenRow, WebhookSettings,
        DELIVERY_QUEUE_BOUND,
    },
    webhooks::schedule::DeliveryState,
};
use jiff::{SignedDuration, Timestamp};
use std::{sync::Arc, time::Duration};

/// One database, opened as many times as a test likes (each open is a new pool, as a
/// restarted gateway or another replica would have).
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(#[allow(dead_code)] Arc<pg_cluster::PgCluster>, String),
}

impl Db {
    async fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    async fn postgres(test: &str) -> Db {
        let cluster = pg_cluster::shared();
        let url = cluster.create_database(test);
        Db::Postgres(cluster, url)
    }

    fn url(&self) -> String {
        match self {
            Db::Sqlite(dir) => format!("sqlite:{}", dir.path().join("postern.db").display()),
            Db::Postgres(_, url) => url.clone(),
        }
    }

    async fn open(&self) -> Store {
        let store = Store::open(&self.url())
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.url()));
        let expected = if matches!(self, Db::Sqlite(_)) {
            Backend::Sqlite
        } else {
            Backend::Postgres
        };
        assert_eq!(store.backend(), expected);
        store
    }
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Db::sqlite().await).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::Db::postgres(stringify!($name)).await).await
                }
            )*
        }
    };
}

on_both_backends!(
    identities_and_appliances,
    enrollment_token_is_consumed_exactly_once,
    endpoints,
    grants_are_decided_once_and_revoked_once,
    ops_compare_and_set_and_output,
    steady_state_and_webhooks,
    audit_appends_from_two_replicas_form_one_chain,
    state_survives_reopen,
    audit_pages_filter_in_the_store,
    endpoints_are_listed_with_their_owner_in_one_query,
    op_output_is_capped_per_stream,
    api_tokens_have_unique_live_names_and_are_revoked_once,
    webhook_deliveries_are_claimed_once_bounded_and_given_up_on_change,
    a_grant_move_and_its_record_commit_together_or_not_at_all,
);

fn hook(url: &str) -> WebhookSettings {
    WebhookSettings {
        url: url.into(),
        secret_sealed: "v1:sealed".into(),
        ca_pem: None,
        allow_private: false,
    }
}

fn delivery(id: &str, customer: &str) -> NewDelivery {
    NewDelivery {
        id: id.into(),
        customer: customer.into(),
        event: "approval.waiting".into(),
        target: "https://h.test".into(),
        body: format!("{{\"delivery\":\"{id}\"}}"),
    }
}

/// Due deliveries are handed to one worker (a second claim of the same due time fails), an
/// attempt's outcome is written only while pending, a customer's pending queue is bounded, and
/// setting the webhook again gives up what was pending.
async fn webhook_deliveries_are_claimed_once_bounded_and_given_up_on_change(db: Db) {
    let s = db.open().await;
    let t0 = ts(T0);
    let at = |secs: i64| t0.checked_add(SignedDuration::from_secs(secs)).unwrap();
    s.set_webhook("acme", Some(&hook("https://h.test")), ts(T0))
        .await
        .unwrap();
    assert_eq!(s.next_delivery_due().await.unwrap(), None);
    assert_eq!(
        s.enqueue_delivery(&delivery("wh_1", "acme"), t0)
            .await
            .unwrap(),
        0
    );
    assert_eq!(s.next_delivery_due().await.unwrap(), Some(t0));
    let due = s.due_deliveries(at(1), 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(
        (due[0].state, due[0].attempts, due[0].next_attempt_at),
        (DeliveryState::Pending, 0, Some(t0))
    );
    assert!(s.claim_delivery("wh_1", t0, at(60)).await.unwrap());
    assert!(
        !s.claim_delivery("wh_1", t0, at(60)).await.unwrap(),
        "taken once"
    );
    assert!(
        s.due_deliveries(at(1), 10).await.unwrap().is_empty(),
        "leased"
    );
    let failed = AttemptRecord {
        attempts: 1,
        last_status: Some(503),
        last_error: Some("the receiver answered 503"),
        state: DeliveryState::Pending,
        next_attempt_at: Some(at(3)),
        delivered_at: None,
    };
    assert!(s.record_attempt("wh_1", &failed).await.unwrap());
    let d = &s.deliveries(Some("acme"), 10).await.unwrap()[0];
    assert_eq!(
        (d.attempts, d.last_status, d.next_attempt_at),
        (1, Some(503), Some(at(3)))
    );
    assert!(s.claim_delivery("wh_1", at(3), at(63)).await.unwrap());
    let delivered = AttemptRecord {
        attempts: 2,
        last_status: Some(204),
        last_error: None,
        state: DeliveryState::Delivered,
        next_attempt_at: None,
        delivered_at: Some(at(4)),
    };
    assert!(s.record_attempt("wh_1", &delivered).await.unwrap());
    assert!(
        !s.record_attempt("wh_1", &failed).await.unwrap(),
        "finished stays finished"
    );
    let d = &s.deliveries(Some("acme"), 10).await.unwrap()[0];
    assert_eq!(
        (d.state, d.delivered_at, d.last_error.as_deref()),
        (DeliveryState::Delivered, Some(at(4)), None)
    );

    // The pending queue is bounded per customer: the oldest pending ones are given up.
    s.enqueue_delivery(&delivery("wh_g", "globex"), t0)
        .await
        .unwrap();
    let mut dropped = 0;
    for n in 0..DELIVERY_QUEUE_BOUND + 2 {
        dropped += s
            .enqueue_delivery(&delivery(&format!("wh_q{n:04}"), "acme"), at(10 + n))
            .await
            .unwrap();
    }
    assert_eq!(dropped, 2);
    let acme = s.deliveries(Some("acme"), 10_000).await.unwrap();
    let pending = acme
        .iter()
        .filter(|d| d.state == DeliveryState::Pending)
        .count();
    assert_eq!(pending as i64, DELIVERY_QUEUE_BOUND);
    for gone in ["wh_q0000", "wh_q0001"] {
        let d = acme.iter().find(|d| d.id == gone).unwrap();
        assert_eq!(d.state, DeliveryState::Failed);
        assert!(
            d.last_error.as_deref().unwrap().contains("pending"),
            "{d:?}"
        );
    }

    // Set again: what was pending for the old setting is given up; other customers untouched.
    let given_up = s
        .set_webhook("acme", Some(&hook("https://new.test")), at(9999))
        .await
        .unwrap();
    assert_eq!(given_up as i64, DELIVERY_QUEUE_BOUND);
    assert!(s
        .deliveries(Some("acme"), 10_000)
        .await
        .unwrap()
        .iter()
        .all(|d| d.state != DeliveryState::Pending));
    let all = s.deliveries(None, 10_000).await.unwrap();
    let g = all.iter().find(|d| d.id == "wh_g").unwrap();
    assert_eq!(g.state, DeliveryState::Pending);
    s.close().await;
}

/// A name belongs to one live token (the unique index, whatever the caller checked before);
/// revocation frees it, happens once, and never takes the last usable admin.
async fn api_tokens_have_unique_live_names_and_are_revoked_once(db: Db) {
    use gateway::store::TokenRevocation;
    let s = db.open().await;
    let admin = TokenRow {
        id: "ad".into(),
        name: "root".into(),
        role: "admin".into(),
        customer: None,
        secret_hash: "h".into(),
        created_at: ts(T0),
        created_by: "system:gateway".into(),
        created_by_id: None,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    assert!(s.insert_token(&admin).await.unwrap());
    let alice = TokenRow {
        id: "a1".into(),
        name: "alice".into(),
        role: "operator".into(),
        created_by_id: Some("ad".into()),
        expires_at: Some(ts(T0 + 60_000)),
        ..admin.clone()
    };
    assert!(s.insert_token(&alice).await.unwrap());
    let twin = TokenRow {
        id: "a2".into(),
        ..alice.clone()
    };
    assert!(
        !s.insert_token(&twin).await.unwrap(),
        "a live name is taken"
    );
    assert!(s.get_token("a2").await.unwrap().is_none());
    assert_eq!(
        s.live_token_named("alice").await.unwrap().map(|t| t.id),
        Some("a1".into())
    );

    assert!(matches!(
        s.revoke_token("a1", ts(T0 + 1)).await.unwrap(),
        TokenRevocation::Revoked(t) if t.revoked_at == Some(ts(T0 + 1))
    ));
    assert!(matches!(
        s.revoke_token("a1", ts(T0 + 2)).await.unwrap(),
        TokenRevocation::AlreadyRevoked(at) if at == ts(T0 + 1)
    ));
    assert!(matches!(
        s.revoke_token("nope", ts(T0 + 2)).await.unwrap(),
        TokenRevocation::NotFound
    ));
    assert!(
        s.insert_token(&twin).await.unwrap(),
        "the name is free again"
    );
    assert!(matches!(
        s.revoke_token("ad", ts(T0 + 3)).await.unwrap(),
        TokenRevocation::LastAdmin
    ));
    assert!(s
        .get_token("ad")
        .await
        .unwrap()
        .unwrap()
        .revoked_at
        .is_none());

    s.touch_token("a2", ts(T0 + 5)).await.unwrap();
    let listed: Vec<(String, Option<Timestamp>, Option<Timestamp>)> = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.id, t.revoked_at, t.last_used_at))
        .collect();
    assert_eq!(
        listed,
        [
            ("a1".into(), Some(ts(T0 + 1)), None),
            ("a2".into(), None, Some(ts(T0 + 5))),
            ("ad".into(), None, None),
        ]
    );
}

/// Each stream stops at 1 MiB (at a character boundary) and the op is marked truncated;
/// the other stream keeps its own room.
async fn op_output_is_capped_per_stream(db: Db) {
    use gateway::store::OP_OUTPUT_CAP;
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    let running = OpRow {
        state: OpState::Running,
        ..op("op_big", "ap_1", T0)
    };
    s.insert_op(&running).await.unwrap();
    let chunk = "x".repeat(300 * 1024);
    for _ in 0..3 {
        assert!(s.append_op_output("op_big", &chunk, "e").await.unwrap());
    }
    assert!(!s.get_op("op_big").await.unwrap().unwrap().truncated);
    // 900 KiB in; the next 300 KiB (ending in two-byte characters) overflows.
    let tail = format!(
        "{}{}",
        "y".repeat(OP_OUTPUT_CAP - 3 * chunk.len() - 1),
        "ü".repeat(1000)
    );
    assert!(s.append_op_output("op_big", &tail, "").await.unwrap());
    let got = s.get_op("op_big").await.unwrap().unwrap();
    let out = got.stdout.unwrap_or_default();
    assert_eq!(out.len(), OP_OUTPUT_CAP - 1, "cut before a split character");
    assert!(out.ends_with('y'));
    assert!(got.truncated);
    // The last byte of room takes one more byte; then nothing fits.
    assert!(s.append_op_output("op_big", "more", "").await.unwrap());
    assert!(s.append_op_output("op_big", "again", "").await.unwrap());
    let got = s.get_op("op_big").await.unwrap().unwrap();
    let out = got.stdout.unwrap_or_default();
    assert_eq!(out.len(), OP_OUTPUT_CAP);
    assert!(out.ends_with("ym"), "{}", &out[out.len() - 4..]);
    assert_eq!(got.stderr.as_deref(), Some("eee"));
    assert!(got.truncated);
    s.close().await;
}

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).expect("timestamp")
}

const T0: i64 = 1_750_000_000_000;

fn appliance(id: &str, app: &str, customer: &str, at: i64) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: app.into(),
        customer: customer.into(),
        created_at: ts(at),
        created_by: "alice".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

fn endpoint(
    id: &str,
    appliance_id: &str,
    state: EndpointState,
    grant: Option<&str>,
    at: i64,
) -> EndpointRow {
    EndpointRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        endpoint_type: EndpointType::Postgres,
        appliance_id: appliance_id.into(),
        resource_id: "db-main".into(),
        state,
        created_by: "bob".into(),
        created_by_id: Some("tok_bob".into()),
        created_at: ts(at),
        expires_at: ts(at + 3_600_000),
        ended_at: None,
        address: None,
        sessions_total: 0,
        grant_id: grant.map(Into::into),
        credential: Some(ClientCredential::Postgres {
            scram_verifier: "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5".into(),
        }),
    }
}

fn grant(id: &str, appliance_id: &str, level: GrantLevel, at: i64) -> GrantRow {
    GrantRow {
        id: id.into(),
        appliance_id: appliance_id.into(),
        level,
        state: GrantState::PendingApproval,
        requested_by: "bob".into(),
        requested_by_id: Some("tok_bob".into()),
        reason: "INC-1: pods crash-looping".into(),
        duration_ms: 1_800_000,
        requested_at: ts(at),
        decided_by: None,
        decided_at: None,
        message: None,
        expires_at: None,
    }
}

fn op(id: &str, appliance_id: &str, at: i64) -> OpRow {
    OpRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        appliance_id: appliance_id.into(),
        tool: OpTool::Kubectl,
        command: "kubectl get pods -n 'my ns'".into(),
        origin_resource_id: "k8s-prod".into(),
        timeout: Duration::from_secs(300),
        state: OpState::PendingApproval,
        requested_by: "bob".into(),
        requested_at: ts(at),
        grant_id: Some("gr_1".into()),
        command_approved_by: None,
        command_approved_at: None,
        output_approved_by: None,
        output_approved_at: None,
        started_at: None,
        finished_at: None,
        exit_code: None,
        stdout: None,
        stderr: None,
        truncated: false,
        error: None,
        message: None,
        requested_by_id: None,
    }
}

async fn identities_and_appliances(db: Db) {
    let s = db.open().await;
    assert_eq!(s.count_admin_tokens().await.unwrap(), 0);
    let token = TokenRow {
        id: "tk_1".into(),
        name: "bootstrap".into(),
        role: "admin".into(),
        customer: None,
        secret_hash: "h".into(),
        created_at: ts(T0),
        created_by: "system".into(),
        created_by_id: None,
        expires_at: None,
        revoked_at: None,
        last_used_at: None,
    };
    assert!(s.insert_token(&token).await.unwrap());
    let approver = TokenRow {
        id: "tk_2".into(),
        name: "carol@acme".into(),
        role: "approver".into(),
        customer: Some("acme".into()),
        created_by_id: Some("tk_1".into()),
        expires_at: Some(ts(T0 + 90_000)),
        ..token.clone()
    };
    assert!(s.insert_token(&approver).await.unwrap());
    assert!(!s.insert_token(&token).await.unwrap(), "duplicate id");
    assert_eq!(s.count_admin_tokens().await.unwrap(), 1);
    let t = s.get_token("tk_2").await.unwrap().unwrap();
    assert_eq!(
        (
            t.role.as_str(),
            t.customer.as_deref(),
            t.created_at,
            t.revoked_at,
            t.expires_at,
            t.created_by_id.as_deref()
        ),
        (
            "approver",
            Some("acme"),
            ts(T0),
            None,
            Some(ts(T0 + 90_000)),
            Some("tk_1")
        )
    );
    assert!(s.get_token("nope").await.unwrap().is_none());

    s.insert_appliance(&appliance("ap_2", "shop", "globex", T0 + 1))
        .await
        .unwrap();
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    let ids: Vec<String> = s
        .list_appliances()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, ["ap_1", "ap_2"], "ordered by creation");
    assert_eq!(
        s.find_appliance("shop", "acme").await.unwrap().unwrap().id,
        "ap_1"
    );
    assert!(s.find_appliance("shop", "initech").await.unwrap().is_none());

    s.set_enrolled("ap_1", "fp-1", ts(T0 + 10)).await.unwrap();
    let a = s.appliance_by_fingerprint("fp-1").await.unwrap().unwrap();
    assert_eq!((a.id.as_str(), a.enrolled_at), ("ap_1", Some(ts(T0 + 10))));

    assert_eq!(s.appliance_policy("ap_1").await.unwrap(), None);
    let policy = PolicySummary {
        steady_state: true,
        ..Default::default()
    };
    let policy_json = serde_json::to_string(&policy).unwrap();
    s.set_presence(
        "ap_1",
        ts(T0 + 20),
        Some("1.2.3"),
        Some(r#"[{"id":"db"}]"#),
        Some(&policy_json),
    )
    .await
    .unwrap();
    s.set_presence("ap_1", ts(T0 + 30), None, None, None)
        .await
        .unwrap();
    let a = s.get_appliance("ap_1").await.unwrap().unwrap();
    assert_eq!(a.last_seen, Some(ts(T0 + 30)));
    assert_eq!(
        a.agent_version.as_deref(),
        Some("1.2.3"),
        "None keeps the last reported version"
    );
    assert_eq!(a.resources, r#"[{"id":"db"}]"#);
    assert_eq!(s.appliance_policy("ap_1").await.unwrap(), Some(policy));

    assert!(s.revoke_appliance("ap_1", ts(T0 + 40)).await.unwrap());
    assert!(!s.revoke_appliance("ap_1", ts(T0 + 50)).await.unwrap());
    assert!(!s.revoke_appliance("nope", ts(T0 + 50)).await.unwrap());
    assert!(
        s.find_appliance("shop", "acme").await.unwrap().is_none(),
        "a revoked appliance is not found"
    );
    assert_eq!(
        s.get_appliance("ap_1").await.unwrap().unwrap().revoked_at,
        Some(ts(T0 + 40))
    );
    s.close().await;
}

async fn enrollment_token_is_consumed_exactly_once(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    let now = gateway::store::now(); // the store keeps milliseconds
    let e = EnrollmentRow {
        id: "en_1".into(),
        appliance_id: "ap_1".into(),
        secret_hash: "h".into(),
        expires_at: now + SignedDuration::from_secs(600),
        used: false,
    };
    s.insert_enrollment_token(&e).await.unwrap();
    s.insert_enrollment_token(&EnrollmentRow {
        id: "en_old".into(),
        expires_at: now - SignedDuration::from_secs(1),
        ..e.clone()
    })
    .await
    .unwrap();
    assert!(
        s.insert_enrollment_token(&EnrollmentRow {
            id: "en_x".into(),
            appliance_id: "nope".into(),
            ..e.clone()
        })
        .await
        .is_err(),
        "foreign key to appliances"
    );

    // 8 callers at once, over two pools (two gateway processes): exactly one wins.
    let other = db.open().await;
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = if i % 2 == 0 { s.clone() } else { other.clone() };
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                store
                    .consume_enrollment_token("en_1", Timestamp::now())
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        wins += usize::from(t.await.unwrap());
    }
    assert_eq!(wins, 1);
    assert!(s.get_enrollment_token("en_1").await.unwrap().unwrap().used);
    assert!(
        !s.consume_enrollment_token("en_old", now).await.unwrap(),
        "expired"
    );
    assert!(
        !s.get_enrollment_token("en_old")
            .await
            .unwrap()
            .unwrap()
            .used
    );
    assert!(!s.consume_enrollment_token("nope", now).await.unwrap());
    assert_eq!(
        s.get_enrollment_token("en_old")
            .await
            .unwrap()
            .unwrap()
            .expires_at,
        e.expires_at - SignedDuration::from_secs(601)
    );
    other.close().await;
    s.close().await;
}

async fn endpoints(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    s.insert_appliance(&appliance("ap_2", "shop", "globex", T0))
        .await
        .unwrap();
    s.insert_endpoint(&endpoint(
        "ep_a",
        "ap_1",
        EndpointState::Active,
        Some("gr_1"),
        T0,
    ))
    .await
    .unwrap();
    s.insert_endpoint(&endpoint(
        "ep_b",
        "ap_1",
        EndpointState::PendingApproval,
        Some("gr_1"),
        T0 + 1,
    ))
    .await
    .unwrap();
    s.insert_endpoint(&endpoint(
        "ep_c",
        "ap_2",
        EndpointState::PendingApproval,
        None,
        T0 + 2,
    ))
    .await
    .unwrap();
    s.insert_endpoint(&endpoint(
        "ep_d",
        "ap_2",
        EndpointState::Active,
        Some("gr_2"),
        T0 + 3,
    ))
    .await
    .unwrap();

    let a = s.get_endpoint("ep_a").await.unwrap().unwrap();
    assert_eq!(a.endpoint_type, EndpointType::Postgres);
    assert_eq!(
        (a.state, a.grant_id.as_deref(), a.expires_at),
        (EndpointState::Active, Some("gr_1"), ts(T0 + 3_600_000))
    );
    // The credential's public half round-trips through the store.
    assert!(
        matches!(&a.credential, Some(ClientCredential::Postgres { scram_verifier }) if scram_verifier.starts_with("SCRAM-SHA-256$4096:"))
    );

    // A pending endpoint is decided once.
    assert!(s
        .activate_endpoint("ep_b", ts(T0 + 60_000), "127.0.0.1:5000")
        .await
        .unwrap());
    assert!(!s
        .activate_endpoint("ep_b", ts(T0 + 60_000), "127.0.0.1:5001")
        .await
        .unwrap());
    assert!(!s.deny_endpoint("ep_b", ts(T0)).await.unwrap());
    let b = s.get_endpoint("ep_b").await.unwrap().unwrap();
    assert_eq!(
        (b.state, b.expires_at, b.address.as_deref()),
        (
            EndpointState::Active,
            ts(T0 + 60_000),
            Some("127.0.0.1:5000")
        )
    );
    assert!(s.deny_endpoint("ep_c", ts(T0 + 5)).await.unwrap());
    let c = s.get_endpoint("ep_c").await.unwrap().unwrap();
    assert_eq!(
        (c.state, c.ended_at),
        (EndpointState::Denied, Some(ts(T0 + 5)))
    );

    let ids = |rows: Vec<EndpointRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_endpoints().await.unwrap()),
        ["ep_a", "ep_b", "ep_c", "ep_d"]
    );
    assert_eq!(
        ids(s.active_endpoints().await.unwrap()),
        ["ep_a", "ep_b", "ep_d"]
    );
    assert_eq!(
        ids(s.active_endpoints_of("ap_1").await.unwrap()),
        ["ep_a", "ep_b"]
    );
    assert_eq!(
        ids(s.active_endpoints_of_grant("gr_1").await.unwrap()),
        ["ep_a", "ep_b"]
    );

    s.set_endpoint_address("ep_a", "127.0.0.1:6000")
        .await
        .unwrap();
    s.count_session("ep_a").await.unwrap();
    s.count_session("ep_a").await.unwrap();
    assert!(s
        .end_endpoint("ep_a", EndpointState::Retired, ts(T0 + 7))
        .await
        .unwrap());
    assert!(
        !s.end_endpoint("ep_a", EndpointState::Expired, ts(T0 + 8))
            .await
            .unwrap(),
        "ended once"
    );
    let a = s.get_endpoint("ep_a").await.unwrap().unwrap();
    assert_eq!(
        (a.state, a.ended_at, a.sessions_total),
        (EndpointState::Retired, Some(ts(T0 + 7)), 2)
    );
    assert_eq!(a.address.as_deref(), Some("127.0.0.1:6000"));
    assert_eq!(
        ids(s.active_endpoints_of_grant("gr_1").await.unwrap()),
        ["ep_b"]
    );
    s.close().await;
}

async fn grants_are_decided_once_and_revoked_once(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    s.insert_appliance(&appliance("ap_2", "shop", "globex", T0))
        .await
        .unwrap();
    s.insert_grant(&grant("gr_b", "ap_1", GrantLevel::Operate, T0 + 1))
        .await
        .unwrap();
    s.insert_grant(&grant("gr_a", "ap_1", GrantLevel::Deploy, T0))
        .await
        .unwrap();
    s.insert_grant(&grant("gr_c", "ap_2", GrantLevel::SteadyState, T0 + 2))
        .await
        .unwrap();
    assert!(
        s.insert_grant(&grant("gr_x", "nope", GrantLevel::Operate, T0))
            .await
            .is_err(),
        "foreign key to appliances"
    );
    assert_eq!(
        s.get_grant("gr_b").await.unwrap().unwrap(),
        grant("gr_b", "ap_1", GrantLevel::Operate, T0 + 1),
        "round trip"
    );
    let ids = |rows: Vec<GrantRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.list_grants().await.unwrap()),
        ["gr_a", "gr_b", "gr_c"]
    );
    assert_eq!(ids(s.grants_of("ap_1").await.unwrap()), ["gr_a", "gr_b"]);

    // Concurrent approvers: one decision sticks.
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let (state, expires) = if i % 2 == 0 {
                    (GrantState::Active, Some(ts(T0 + 1_800_100)))
                } else {
                    (GrantState::Denied, None)
                };
                let by = format!("approver-{i}");
                s.decide_grant("gr_b", state, &by, ts(T0 + 100), Some("ok"), expires)
                    .await
                    .unwrap()
                    .then_some(by)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        winners.extend(t.await.unwrap());
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let g = s.get_grant("gr_b").await.unwrap().unwrap();
    assert_eq!(g.decided_by.as_deref(), Some(winners[0].as_str()));
    assert_eq!(
        (g.decided_at, g.message.as_deref()),
        (Some(ts(T0 + 100)), Some("ok"))
    );
    let approved = g.state == GrantState::Active;
    assert_eq!(g.expires_at, approved.then(|| ts(T0 + 1_800_100)));
    assert!(!s
        .decide_grant("gr_b", GrantState::Denied, "late", ts(T0 + 200), None, None)
        .await
        .unwrap());
    assert!(!s
        .decide_grant("nope", GrantState::Denied, "x", ts(T0), None, None)
        .await
        .unwrap());

    // Revoke only what is active, once; the approval stays recorded.
    assert!(
        !s.revoke_grant("gr_a", "bob", ts(T0 + 300)).await.unwrap(),
        "pending is not revocable"
    );
    assert_eq!(
        s.revoke_grant("gr_b", "bob", ts(T0 + 300)).await.unwrap(),
        approved
    );
    assert!(!s.revoke_grant("gr_b", "bob", ts(T0 + 400)).await.unwrap());
    let g = s.get_grant("gr_b").await.unwrap().unwrap();
    assert_eq!(
        g.state,
        if approved {
            GrantState::Revoked
        } else {
            GrantState::Denied
        }
    );
    assert_eq!(
        (g.decided_by.as_deref(), g.decided_at),
        (Some(winners[0].as_str()), Some(ts(T0 + 100)))
    );

    assert!(s
        .decide_grant(
            "gr_c",
            GrantState::Active,
            "policy:automatic",
            ts(T0 + 5),
            None,
            Some(ts(T0 + 10))
        )
        .await
        .unwrap());
    assert!(s.revoke_grant("gr_c", "carol", ts(T0 + 6)).await.unwrap());
    assert_eq!(
        s.get_grant("gr_c").await.unwrap().unwrap().state,
        GrantState::Revoked
    );
    s.close().await;
}

async fn ops_compare_and_set_and_output(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    let o = op("op_1", "ap_1", T0);
    s.insert_op(&o).await.unwrap();
    s.insert_op(&OpRow {
        id: "op_0".into(),
        tool: OpTool::Psql,
        requested_at: ts(T0 - 1),
        ..o.clone()
    })
    .await
    .unwrap();
    assert!(
        s.insert_op(&op("op_x", "nope", T0)).await.is_err(),
        "foreign key to appliances"
    );
    assert_eq!(s.get_op("op_1").await.unwrap().unwrap(), o, "round trip");
    assert!(s.get_op("nope").await.unwrap().is_none());

    // pending-approval → approved
    let approved = OpRow {
        state: OpState::Approved,
        command_approved_by: Some("carol".into()),
        command_approved_at: Some(ts(T0 + 10)),
        ..o.clone()
    };
    assert!(s
        .update_op(&approved, OpState::PendingApproval)
        .await
        .unwrap());
    // A second approver working from the same stale read loses.
    let denied = OpRow {
        state: OpState::Denied,
        message: Some("not now".into()),
        ..o.clone()
    };
    assert!(!s
        .update_op(&denied, OpState::PendingApproval)
        .await
        .unwrap());
    assert_eq!(s.get_op("op_1").await.unwrap().unwrap(), approved);

    // approved → running, output streams in
    let running = OpRow {
        state: OpState::Running,
        started_at: Some(ts(T0 + 20)),
        ..approved.clone()
    };
    assert!(s.update_op(&running, OpState::Approved).await.unwrap());
    assert!(s.append_op_output("op_1", "line 1\n", "").await.unwrap());
    assert!(s
        .append_op_output("op_1", "line 2 ünïcode\n", "warn\n")
        .await
        .unwrap());
    assert!(s.append_op_output("op_1", "", "").await.unwrap());
    assert!(!s.append_op_output("nope", "x", "y").await.unwrap());
    let got = s.get_op("op_1").await.unwrap().unwrap();
    assert_eq!(got.stdout.as_deref(), Some("line 1\nline 2 ünïcode\n"));
    assert_eq!(got.stderr.as_deref(), Some("warn\n"));
    assert!(!got.truncated);
    // Only a running op (or one releasing held output) takes output.
    assert!(
        !s.append_op_output("op_0", "early", "").await.unwrap(),
        "pending-approval"
    );
    assert_eq!(s.get_op("op_0").await.unwrap().unwrap().stdout, None);

    // running → timed-out, with a structured error; CAS against the stale state fails after.
    let error =
        ApiError::new(ErrorCode::CommandTimeout, "the command ran past 5m").hint("raise --timeout");
    let timed_out = OpRow {
        state: OpState::TimedOut,
        finished_at: Some(ts(T0 + 300_020)),
        exit_code: Some(-9),
        truncated: true,
        error: Some(error.clone()),
        ..got.clone()
    };
    assert!(s.update_op(&timed_out, OpState::Running).await.unwrap());
    assert!(!s
        .update_op(
            &OpRow {
                state: OpState::Completed,
                ..got
            },
            OpState::Running
        )
        .await
        .unwrap());
    let got = s.get_op("op_1").await.unwrap().unwrap();
    assert_eq!(got, timed_out);
    assert_eq!(got.error, Some(error));

    // An ended op never changes, whatever it is asked to become.
    let revived = OpRow {
        state: OpState::Completed,
        ..timed_out.clone()
    };
    assert!(matches!(
        s.update_op(&revived, OpState::TimedOut).await,
        Err(gateway::store::StoreError::IllegalTransition(_))
    ));
    assert_eq!(s.get_op("op_1").await.unwrap().unwrap(), timed_out);
    assert!(
        !s.append_op_output("op_1", "late", "late").await.unwrap(),
        "an ended op takes no more output"
    );
    assert_eq!(s.get_op("op_1").await.unwrap().unwrap(), timed_out);

    // The request itself is immutable through update_op.
    let tampered = OpRow {
        command: "rm -rf /".into(),
        ..s.get_op("op_0").await.unwrap().unwrap()
    };
    assert!(s
        .update_op(&tampered, OpState::PendingApproval)
        .await
        .unwrap());
    assert_eq!(s.get_op("op_0").await.unwrap().unwrap().command, o.command);

    let ids = |rows: Vec<OpRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(s.list_ops().await.unwrap()), ["op_0", "op_1"]);
    assert_eq!(ids(s.ops_of("ap_1").await.unwrap()), ["op_0", "op_1"]);
    assert_eq!(
        ids(s.ops_in_state(OpState::PendingApproval).await.unwrap()),
        ["op_0"]
    );
    s.close().await;
}

async fn steady_state_and_webhooks(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    assert_eq!(
        s.steady_state("ap_1").await.unwrap(),
        Some(true),
        "on by default"
    );
    assert!(s.set_steady_state("ap_1", false).await.unwrap());
    assert_eq!(s.steady_state("ap_1").await.unwrap(), Some(false));
    assert!(s.set_steady_state("ap_1", true).await.unwrap());
    assert_eq!(s.steady_state("ap_1").await.unwrap(), Some(true));
    assert!(!s.set_steady_state("nope", false).await.unwrap());
    assert_eq!(s.steady_state("nope").await.unwrap(), None);

    assert_eq!(s.webhook("acme").await.unwrap(), None);
    s.set_webhook(
        "acme",
        Some(&hook("https://hooks.acme.test/postern")),
        ts(T0),
    )
    .await
    .unwrap();
    s.set_webhook("globex", Some(&hook("https://globex.test/h")), ts(T0))
        .await
        .unwrap();
    assert_eq!(
        s.webhook("acme").await.unwrap(),
        Some(hook("https://hooks.acme.test/postern"))
    );
    let custom = WebhookSettings {
        ca_pem: Some("PEM".into()),
        allow_private: true,
        ..hook("https://hooks.acme.test/v2")
    };
    s.set_webhook("acme", Some(&custom), ts(T0)).await.unwrap();
    assert_eq!(s.webhook("acme").await.unwrap(), Some(custom));
    s.set_webhook("acme", None, ts(T0)).await.unwrap();
    assert_eq!(s.webhook("acme").await.unwrap(), None);
    assert_eq!(
        s.webhook("globex").await.unwrap(),
        Some(hook("https://globex.test/h"))
    );
    s.close().await;
}

async fn audit_appends_from_two_replicas_form_one_chain(db: Db) {
    const PER_REPLICA: usize = 25;
    let (s1, s2) = (db.open().await, db.open().await);
    let (log1, log2) = (
        Arc::new(AuditLog::open(s1.clone()).await.unwrap()),
        Arc::new(AuditLog::open(s2.clone()).await.unwrap()),
    );
    let barrier = Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = Vec::new();
    for (i, log) in [log1.clone(), log2.clone(), log1.clone(), log2.clone()]
        .into_iter()
        .enumerate()
    {
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            for n in 0..PER_REPLICA / 2 + 1 {
                log.append(
                    "op.requested",
                    &format!("writer-{i}"),
                    Subject::appliance("ap_1"),
                    serde_json::json!({"n": n}),
                    Timestamp::now(),
                )
                .await
                .unwrap();
            }
        }));
    }
    // And the store's primitive directly, from both pools at once.
    for (i, store) in [s1.clone(), s2.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..5 {
                store
                    .append_audit_with(|seq, prev| {
                        let mut r = AuditRecord {
                            seq,
                            time: Timestamp::now(),
                            kind: "raw".into(),
                            actor: format!("store-{i}"),
                            appliance_id: None,
                            endpoint_id: None,
                            session_id: None,
                            op_id: Some(format!("op_{n}")),
                            detail: serde_json::Value::Null,
                            prev_hash: prev.to_string(),
                            hash: String::new(),
                        };
                        r.hash = sha256_hex(&r.chain_input());
                        r
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    // And queued statements, written in multi-row batches by each log's writer.
    const QUEUED: usize = 150;
    for (i, log) in [log1.clone(), log2.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let subject = Arc::new(Subject::session("ap_1", "ep_1", &format!("ses_{i}")));
            for n in 0..QUEUED {
                log.enqueue(
                    "sql.statement",
                    Arc::from(format!("queue-{i}")),
                    subject.clone(),
                    serde_json::value::to_raw_value(
                        &serde_json::json!({ "n": n, "text": "select '\u{1b}'" }),
                    )
                    .unwrap(),
                )
                .await;
            }
            log.flush().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = 4 * (PER_REPLICA / 2 + 1) + 10 + 2 * QUEUED;
    let records = s1.list_audit(0).await.unwrap();
    assert_eq!(records.len(), total);
    assert_eq!(verify_chain(&records, sha256_hex), Ok(total as u64));
    let writers: std::collections::HashSet<&str> =
        records.iter().map(|r| r.actor.as_str()).collect();
    assert_eq!(writers.len(), 8, "every writer got in");
    for i in 0..2 {
        let queued: Vec<_> = records
            .iter()
            .filter(|r| r.actor == format!("queue-{i}"))
            .filter_map(|r| r.detail["n"].as_u64())
            .collect();
        assert_eq!(
            queued,
            (0..QUEUED as u64).collect::<Vec<_>>(),
            "queue-{i} in order"
        );
    }
    assert_eq!(log1.verify().await.unwrap(), Ok(total as u64));
    assert_eq!(log2.verify().await.unwrap(), Ok(total as u64));
    assert_eq!(
        s2.last_audit().await.unwrap(),
        Some((total as i64, records[total - 1].hash.clone()))
    );

    // A record that does not continue the chain is refused.
    let bad = s1
        .append_audit_with(|seq, _prev| AuditRecord {
            seq,
            time: Timestamp::now(),
            kind: "bad".into(),
            actor: "mallory".into(),
            appliance_id: None,
            endpoint_id: None,
            session_id: None,
            op_id: None,
            detail: serde_json::Value::Null,
            prev_hash: "0".repeat(64),
            hash: String::new(),
        })
        .await;
    assert!(bad.is_err());
    assert_eq!(
        s1.list_audit(total as i64 - 1).await.unwrap().len(),
        1,
        "nothing was written"
    );
    s1.close().await;
    s2.close().await;
}

async fn state_survives_reopen(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    s.insert_grant(&grant("gr_1", "ap_1", GrantLevel::Operate, T0))
        .await
        .unwrap();
    s.insert_op(&op("op_1", "ap_1", T0)).await.unwrap();
    s.insert_endpoint(&endpoint(
        "ep_1",
        "ap_1",
        EndpointState::Active,
        Some("gr_1"),
        T0,
    ))
    .await
    .unwrap();
    s.set_webhook("acme", Some(&hook("https://h.test")), ts(T0))
        .await
        .unwrap();
    s.set_steady_state("ap_1", false).await.unwrap();
    let log = AuditLog::open(s.clone()).await.unwrap();
    for n in 0..3 {
        log.append(
            "k",
            "alice",
            Subject::default(),
            serde_json::json!({"n": n}),
            Timestamp::now(),
        )
        .await
        .unwrap();
    }
    s.close().await;

    // Migrations run again on open and find nothing to do.
    let s = db.open().await;
    assert_eq!(
        s.get_appliance("ap_1").await.unwrap().unwrap().customer,
        "acme"
    );
    assert_eq!(
        s.get_grant("gr_1").await.unwrap().unwrap(),
        grant("gr_1", "ap_1", GrantLevel::Operate, T0)
    );
    assert_eq!(
        s.get_op("op_1").await.unwrap().unwrap(),
        op("op_1", "ap_1", T0)
    );
    assert_eq!(
        s.get_endpoint("ep_1")
            .await
            .unwrap()
            .unwrap()
            .grant_id
            .as_deref(),
        Some("gr_1")
    );
    assert_eq!(
        s.webhook("acme").await.unwrap(),
        Some(hook("https://h.test"))
    );
    assert_eq!(s.steady_state("ap_1").await.unwrap(), Some(false));
    let log = AuditLog::open(s.clone()).await.unwrap();
    let r = log
        .append(
            "k",
            "alice",
            Subject::default(),
            serde_json::Value::Null,
            Timestamp::now(),
        )
        .await
        .unwrap();
    assert_eq!(r.seq, 4, "the chain continues");
    assert_eq!(log.verify().await.unwrap(), Ok(4));
    s.close().await;
}

/// `Store::open` refuses what it cannot open, without echoing a password.
#[tokio::test]
async fn open_rejects_unknown_urls() {
    let err = Store::open("mysql://root:hunter2@db/postern")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unsupported store URL") && !err.contains("hunter2"),
        "{err}"
    );
    assert!(Store::open("sqlite:").await.is_err());
}

/// Pages come back in order, each at most `limit` long, with `next_after_seq` set while more
/// may follow; the appliance, approver and time filters apply inside the store.
async fn audit_pages_filter_in_the_store(db: Db) {
    let s = db.open().await;
    let start = Timestamp::from_second(1_800_000_000).unwrap();
    for n in 0..25i64 {
        s.append_audit_with(|seq, prev| {
            let mut r = AuditRecord {
                seq,
                // Fractions of a second of every length, so text order differs from time order.
                time: start + SignedDuration::from_millis(n * 250 + (n % 3)),
                kind: "op.requested".into(),
                actor: "alice".into(),
                appliance_id: Some(format!("ap_{}", n % 3)),
                endpoint_id: None,
                session_id: None,
                op_id: None,
                detail: serde_json::json!({ "n": n }),
                prev_hash: prev.to_string(),
                hash: String::new(),
            };
            r.hash = sha256_hex(&r.chain_input());
            r
        })
        .await
        .unwrap();
    }
    let q = |after_seq: i64, limit: u32| AuditPageQuery {
        after_seq,
        limit,
        ..AuditPageQuery::default()
    };
    let mut seen = Vec::new();
    let mut after = 0;
    for _ in 0..10 {
        let page = s.audit_page(&q(after, 10)).await.unwrap();
        assert!(page.records.len() <= 10);
        seen.extend(page.records.iter().map(|r| r.seq));
        match page.next_after_seq {
            Some(next) => after = next,
            None => break,
        }
    }
    assert_eq!(seen, (1..=25).collect::<Vec<_>>());

    let of = |appliance: Option<&str>, appliances_in: Option<Vec<&str>>| AuditPageQuery {
        limit: 100,
        appliance: appliance.map(str::to_string),
        appliances_in: appliances_in.map(|v| v.into_iter().map(str::to_string).collect()),
        ..AuditPageQuery::default()
    };
    let page = s.audit_page(&of(Some("ap_1"), None)).await.unwrap();
    assert_eq!(
        page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![2, 5, 8, 11, 14, 17, 20, 23]
    );
    assert_eq!(page.next_after_seq, None);
    let page = s
        .audit_page(&of(None, Some(vec!["ap_0", "ap_2"])))
        .await
        .unwrap();
    assert_eq!(page.records.len(), 17);
    assert!(page
        .records
        .iter()
        .all(|r| r.appliance_id.as_deref() != Some("ap_1")));
    assert!(s
        .audit_page(&of(None, Some(vec![])))
        .await
        .unwrap()
        .records
        .is_empty());

    // `since` is exact to the millisecond though times are stored as text.
    for n in [0i64, 4, 5, 13, 24] {
        let since = start + SignedDuration::from_millis(n * 250 + (n % 3));
        let page = s
            .audit_page(&AuditPageQuery {
                since: Some(since),
                ..of(None, None)
            })
            .await
            .unwrap();
        let want: Vec<i64> = (n + 1..=25).collect();
        assert_eq!(
            page.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            want,
            "since record {}",
            n + 1
        );
    }
    s.close().await;
}

/// `endpoints::list` reads endpoints with their appliance's app and customer in one join
/// (it made one appliance query per endpoint before); an approver's list filters in SQL.
async fn endpoints_are_listed_with_their_owner_in_one_query(db: Db) {
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    s.insert_appliance(&appliance("ap_2", "crm", "globex", T0 + 1))
        .await
        .unwrap();
    s.insert_appliance(&appliance("ap_3", "shop", "initech", T0 + 2))
        .await
        .unwrap();
    assert!(s.list_endpoints_with_owner(None).await.unwrap().is_empty());
    // Inserted out of creation order: the list is oldest first whatever the insert order.
    for (id, ap, state, at) in [
        ("ep_c", "ap_1", EndpointState::Active, T0 + 30),
        ("ep_a", "ap_2", EndpointState::PendingApproval, T0 + 10),
        ("ep_b", "ap_1", EndpointState::Active, T0 + 20),
        ("ep_d", "ap_2", EndpointState::Active, T0 + 40),
    ] {
        s.insert_endpoint(&endpoint(id, ap, state, Some("gr_1"), at))
            .await
            .unwrap();
    }
    assert!(s
        .end_endpoint("ep_d", EndpointState::Retired, ts(T0 + 50))
        .await
        .unwrap());
    s.count_session("ep_b").await.unwrap();

    let all = s.list_endpoints_with_owner(None).await.unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = all
        .iter()
        .map(|r| {
            (
                r.endpoint.id.as_str(),
                r.endpoint.appliance_id.as_str(),
                r.app.as_str(),
                r.customer.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ep_a", "ap_2", "crm", "globex"),
            ("ep_b", "ap_1", "shop", "acme"),
            ("ep_c", "ap_1", "shop", "acme"),
            ("ep_d", "ap_2", "crm", "globex"),
        ]
    );
    // Every endpoint column reads back as `get_endpoint` reads it.
    for r in &all {
        let one = s.get_endpoint(&r.endpoint.id).await.unwrap().unwrap();
        assert_eq!(format!("{:?}", r.endpoint), format!("{one:?}"));
    }
    let d = &all[3].endpoint;
    assert_eq!(
        (d.state, d.ended_at, d.created_at),
        (EndpointState::Retired, Some(ts(T0 + 50)), ts(T0 + 40))
    );
    assert_eq!(all[1].endpoint.sessions_total, 1);
    assert!(
        matches!(&all[0].endpoint.credential, Some(ClientCredential::Postgres { scram_verifier }) if scram_verifier.starts_with("SCRAM-SHA-256$"))
    );

    let ids = |rows: Vec<gateway::store::EndpointWithOwner>| {
        rows.into_iter().map(|r| r.endpoint.id).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(s.list_endpoints_with_owner(Some("acme")).await.unwrap()),
        ["ep_b", "ep_c"]
    );
    assert_eq!(
        ids(s.list_endpoints_with_owner(Some("globex")).await.unwrap()),
        ["ep_a", "ep_d"]
    );
    assert!(s
        .list_endpoints_with_owner(Some("initech"))
        .await
        .unwrap()
        .is_empty());
    assert!(s
        .list_endpoints_with_owner(Some("nobody"))
        .await
        .unwrap()
        .is_empty());
    s.close().await;
}

/// A revocation through the vendor trail (`AuditLog::record_grant_move`): 8 callers revoke 4
/// grants twice over at once, beside plain records, so batches mix moves that win, moves that
/// lose and records that stand on nothing. Each grant is revoked once and recorded once; a
/// move that lost is not recorded, and the records around it are; the chain stays gapless.
async fn a_grant_move_and_its_record_commit_together_or_not_at_all(db: Db) {
    use endpoint_types::lifecycle::grant::GrantEvent;
    let s = db.open().await;
    s.insert_appliance(&appliance("ap_1", "shop", "acme", T0))
        .await
        .unwrap();
    let approve = GrantChange {
        by: "approver",
        at: ts(T0 + 10),
        message: None,
        expires_at: Some(ts(T0 + 3_600_000)),
    };
    for i in 0..5 {
        let id = format!("gr_{i}");
        s.insert_grant(&grant(&id, "ap_1", GrantLevel::Operate, T0 + i))
            .await
            .unwrap();
        assert!(s
            .move_grant(
                &id,
                GrantState::PendingApproval,
                GrantEvent::Approve,
                approve
            )
            .await
            .unwrap());
    }
    let log = Arc::new(AuditLog::open(s.clone()).await.unwrap());
    let revoke = |i: usize| {
        let change = GrantChange {
            by: "security",
            at: ts(T0 + 20),
            message: None,
            expires_at: None,
        };
        GrantMove::new(
            &format!("gr_{i}"),
            GrantState::Active,
            GrantEvent::Revoke,
            change,
        )
    };
    // A move that loses on its own: the grant was revoked already.
    assert!(s
        .move_grant(
            "gr_4",
            GrantState::Active,
            GrantEvent::Revoke,
            revoke(4).change()
        )
        .await
        .unwrap());
    let lone = log
        .record_grant_move(
            "grant.revoked",
            "security",
            Subject::appliance("ap_1"),
            serde_json::json!({ "grant_id": "gr_4" }),
            revoke(4),
        )
        .await
        .unwrap();
    assert!(!lone, "the grant was revoked already: the move loses");

    let barrier = Arc::new(tokio::sync::Barrier::new(12));
    let moves: Vec<_> = (0..8)
        .map(|k| {
            let (log, barrier, m) = (log.clone(), barrier.clone(), revoke(k % 4));
            tokio::spawn(async move {
                barrier.wait().await;
                let detail = serde_json::json!({ "grant_id": m.id, "caller": k });
                let won = log
                    .record_grant_move(
                        "grant.revoked",
                        "security",
                        Subject::appliance("ap_1"),
                        detail,
                        m,
                    )
                    .await
                    .unwrap();
                (k % 4, won)
            })
        })
        .collect();
    let plain: Vec<_> = (0..4)
        .map(|k| {
            let (log, barrier) = (log.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                log.record(
                    "note",
                    "x",
                    Subject::appliance("ap_1"),
                    serde_json::json!({ "k": k }),
                )
                .await;
            })
        })
        .collect();
    let mut winners = [0; 4];
    for t in moves {
        let (i, won) = t.await.unwrap();
        winners[i] += usize::from(won);
    }
    for t in plain {
        t.await.unwrap();
    }
    assert_eq!(
        winners, [1; 4],
        "each grant is revoked by exactly one caller"
    );

    let records = s.list_audit(0).await.unwrap();
    for i in 0..5 {
        let id = format!("gr_{i}");
        let g = s.get_grant(&id).await.unwrap().unwrap();
        assert_eq!(g.state, GrantState::Revoked, "{id}");
        let recorded = records
            .iter()
            .filter(|r| r.kind == "grant.revoked" && r.detail["grant_id"] == id.as_str())
            .count();
        // gr_4 was revoked beside the trail, before the log's move lost.
        assert_eq!(recorded, usize::from(i < 4), "{id}: {records:?}");
    }
    assert_eq!(records.iter().filter(|r| r.kind == "note").count(), 4);
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>(),
        "gapless: a lost move takes no seq"
    );
    assert_eq!(log.verify().await.unwrap(), Ok(8));

    // A decision goes the same way, with its message and expiry.
    s.insert_grant(&grant("gr_5", "ap_1", GrantLevel::Operate, T0 + 5))
        .await
        .unwrap();
    let decide = |event| {
        let change = GrantChange {
            by: "approver-acme",
            at: ts(T0 + 30),
            message: Some("go ahead"),
            expires_at: Some(ts(T0 + 1_800_030)),
        };
        GrantMove::new("gr_5", GrantState::PendingApproval, event, change)
    };
    let subject = || Subject::appliance("ap_1");
    let detail = serde_json::json!({ "grant_id": "gr_5" });
    assert!(log
        .record_grant_move(
            "grant.approved",
            "approver-acme",
            subject(),
            detail.clone(),
            decide(GrantEvent::Approve)
        )
        .await
        .unwrap());
    assert!(!log
        .record_grant_move(
            "grant.denied",
            "approver-acme",
            subject(),
            detail,
            decide(GrantEvent::Deny)
        )
        .await
        .unwrap());
    let g = s.get_grant("gr_5").await.unwrap().unwrap();
    assert_eq!(g.state, GrantState::Active);
    assert_eq!(g.decided_by.as_deref(), Some("approver-acme"));
    assert_eq!(g.decided_at, Some(ts(T0 + 30)));
    assert_eq!(g.message.as_deref(), Some("go ahead"));
    assert_eq!(g.expires_at, Some(ts(T0 + 1_800_030)));
    let kinds: Vec<_> = s
        .list_audit(8)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["grant.approved"]);
    assert_eq!(log.verify().await.unwrap(), Ok(9));
}
