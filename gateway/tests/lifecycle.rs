//! Nothing that ended comes back: random event sequences driven through the grant, op and
//! endpoint state machines *and* the store's compare-and-set moves, checking after every step
//! that the store holds exactly the state the pure machine says, that a request working from a
//! stale read never moves a record, that the store itself refuses a move the machine refuses,
//! and that a record that reached an end state never leaves it. Then two "replicas" (two
//! pools on one database) race a retire against an approval, on SQLite and PostgreSQL.

use endpoint_types::{
    api::{ClientCredential, EndpointState},
    control::{GrantLevel, GrantState, OpState, OpTool},
    lifecycle::{
        self,
        endpoint::{self as endpoint_lifecycle, EndpointEvent},
        grant::{self as grant_lifecycle, GrantEvent},
        grant_state, OpEvent,
    },
    resource::EndpointType,
};
use gateway::store::{ApplianceRow, EndpointRow, GrantChange, GrantRow, OpRow, Store, StoreError};
use jiff::Timestamp;
use proptest::prelude::*;
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::Duration,
};

const T0: i64 = 1_750_000_000_000;
/// How long an approved grant lasts in these tests.
const GRANT_MS: i64 = 1_000;

fn ts(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).expect("timestamp")
}

/// One runtime and one SQLite database (a file in a temp dir) for every case: each case works
/// on records with fresh ids, so cases stay independent and the suite stays fast.
struct Shared {
    rt: tokio::runtime::Runtime,
    store: Store,
    _dir: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("tempdir");
        let store = rt.block_on(async {
            let s = Store::open(&format!(
                "sqlite:{}",
                dir.path().join("postern.db").display()
            ))
            .await
            .expect("open store");
            s.insert_appliance(&appliance("ap_1"))
                .await
                .expect("appliance");
            s
        });
        Shared {
            rt,
            store,
            _dir: dir,
        }
    })
}

fn fresh_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn appliance(id: &str) -> ApplianceRow {
    ApplianceRow {
        id: id.into(),
        app: "shop".into(),
        customer: "acme".into(),
        created_at: ts(T0),
        created_by: "alice".into(),
        cert_fingerprint: None,
        enrolled_at: None,
        revoked_at: None,
        last_seen: None,
        agent_version: None,
        resources: "[]".into(),
    }
}

fn grant_row(id: &str) -> GrantRow {
    GrantRow {
        id: id.into(),
        appliance_id: "ap_1".into(),
        level: GrantLevel::Operate,
        state: GrantState::PendingApproval,
        requested_by: "bob".into(),
        requested_by_id: None,
        reason: "INC-1".into(),
        duration_ms: GRANT_MS,
        requested_at: ts(T0),
        decided_by: None,
        decided_at: None,
        message: None,
        expires_at: None,
    }
}

fn endpoint_row(id: &str) -> EndpointRow {
    EndpointRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        endpoint_type: EndpointType::Postgres,
        appliance_id: "ap_1".into(),
        resource_id: "db-main".into(),
        state: EndpointState::PendingApproval,
        created_by: "bob".into(),
        created_by_id: None,
        created_at: ts(T0),
        expires_at: ts(T0 + 3_600_000),
        ended_at: None,
        address: None,
        sessions_total: 0,
        grant_id: Some("gr_1".into()),
        credential: Some(ClientCredential::Postgres {
            scram_verifier: "SCRAM-SHA-256$4096:c2FsdA==$a2V5:a2V5".into(),
        }),
    }
}

fn op_row(id: &str) -> OpRow {
    OpRow {
        phase: endpoint_types::phase::operate(),
        id: id.into(),
        appliance_id: "ap_1".into(),
        tool: OpTool::Kubectl,
        command: "kubectl get pods".into(),
        origin_resource_id: "k8s".into(),
        timeout: Duration::from_secs(300),
        state: OpState::PendingApproval,
        requested_by: "bob".into(),
        requested_at: ts(T0),
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

/// One step of a sequence: an event, and how stale the requester's read of the record is (0:
/// read just now; n: read n moves ago, as a racing request or another replica would have).
fn steps<E: std::fmt::Debug + Clone>(
    events: impl Strategy<Value = E>,
) -> impl Strategy<Value = Vec<(E, usize)>> {
    prop::collection::vec(
        (events, prop_oneof![4 => Just(0usize), 1 => 1usize..4]),
        1..14,
    )
}

/// The state read `lag` moves ago.
fn read_at<S: Copy>(history: &[S], lag: usize) -> S {
    history[history.len().saturating_sub(1 + lag)]
}

/// Once a record reached an end state, every later state is that one.
fn assert_ends_stay<S: Copy + PartialEq + std::fmt::Debug>(
    history: &[S],
    is_final: impl Fn(S) -> bool,
) {
    if let Some(i) = history.iter().position(|s| is_final(*s)) {
        assert!(
            history[i..].iter().all(|s| *s == history[i]),
            "an ended record moved: {history:?}"
        );
    }
}

fn grant_events() -> impl Strategy<Value = GrantEvent> {
    prop::sample::select(GrantEvent::ALL.to_vec())
}

fn endpoint_events() -> impl Strategy<Value = EndpointEvent> {
    prop::sample::select(EndpointEvent::ALL.to_vec())
}

fn op_events() -> impl Strategy<Value = OpEvent> {
    let by = || "ana@customer".to_string();
    prop::sample::select(vec![
        OpEvent::CommandApproved { by: by() },
        OpEvent::CommandDenied {
            by: by(),
            message: Some("no".into()),
        },
        OpEvent::PolicyRecheckFailed,
        OpEvent::Dispatched,
        OpEvent::Started,
        OpEvent::Finished {
            exit_code: 0,
            output_held: false,
        },
        OpEvent::Finished {
            exit_code: 2,
            output_held: false,
        },
        OpEvent::Finished {
            exit_code: 0,
            output_held: true,
        },
        OpEvent::TimedOut,
        OpEvent::OutputApproved { by: by() },
        OpEvent::OutputReleased {
            by: by(),
            exit_code: 0,
        },
        OpEvent::OutputReleased {
            by: by(),
            exit_code: 1,
        },
        OpEvent::OutputDenied {
            by: by(),
            message: None,
        },
        OpEvent::AgentRefused,
        OpEvent::AgentDenied,
        OpEvent::AgentLost,
        OpEvent::Expired,
    ])
}

/// Grants: approve/deny/revoke through `move_grant`; expiry is the clock passing `expires_at`
/// (never stored), which the revoke's compare-and-set must respect.
async fn run_grant(store: &Store, seq: Vec<(GrantEvent, usize)>) {
    let id = fresh_id("gr");
    store.insert_grant(&grant_row(&id)).await.unwrap();
    let mut now = T0 + 10;
    let mut history = vec![GrantState::PendingApproval];
    for (event, lag) in seq {
        let cur = *history.last().unwrap();
        let read = read_at(&history, lag);
        let row = store.get_grant(&id).await.unwrap().unwrap();
        // Where the grant is after this step: moved by the request, or by the clock.
        let mut want = cur;
        if event == GrantEvent::Expire {
            // The clock runs out the grant (a no-op for grants without an expiry).
            now = now.max(row.expires_at.map_or(now, |t| t.as_millisecond()));
            want = grant_lifecycle::next(cur, event).unwrap_or(cur);
        } else {
            // What the gateway writes from: the stored state behind the state it read.
            let from = if read == GrantState::Expired {
                GrantState::Active
            } else {
                read
            };
            let change = GrantChange {
                by: "ana",
                at: ts(now),
                message: None,
                expires_at: Some(ts(now + GRANT_MS)),
            };
            match grant_lifecycle::next(read, event) {
                Ok(to) => {
                    let moved = store.move_grant(&id, from, event, change).await.unwrap();
                    assert_eq!(
                        moved,
                        read == cur,
                        "{id}: {} from {} (now {})",
                        event.name(),
                        read.as_str(),
                        cur.as_str()
                    );
                    if moved {
                        want = to;
                    }
                }
                // The store refuses on its own what the machine refuses.
                Err(_) => assert!(matches!(
                    store.move_grant(&id, read, event, change).await,
                    Err(StoreError::IllegalTransition(_))
                )),
            }
        }
        now += 1;
        let row = store.get_grant(&id).await.unwrap().unwrap();
        let got = grant_state(row.state, row.expires_at, ts(now));
        assert_eq!(
            got,
            want,
            "{id}: store and machine disagree after {}",
            event.name()
        );
        history.push(got);
    }
    assert_ends_stay(&history, grant_lifecycle::is_final);
}

/// Endpoints: approve through `activate_endpoint` (compare-and-set on pending-approval), the
/// rest through `move_endpoint`.
async fn run_endpoint(store: &Store, seq: Vec<(EndpointEvent, usize)>) {
    let id = fresh_id("ep");
    store.insert_endpoint(&endpoint_row(&id)).await.unwrap();
    let mut history = vec![EndpointState::PendingApproval];
    for (event, lag) in seq {
        let cur = *history.last().unwrap();
        let read = read_at(&history, lag);
        let want = match (endpoint_lifecycle::next(read, event), event) {
            (Ok(to), EndpointEvent::Approve) => {
                let moved = store
                    .activate_endpoint(&id, ts(T0 + 60_000), "127.0.0.1:1")
                    .await
                    .unwrap();
                assert_eq!(
                    moved,
                    cur == EndpointState::PendingApproval,
                    "{id}: approve (now {})",
                    cur.as_str()
                );
                if moved {
                    to
                } else {
                    cur
                }
            }
            (Ok(to), _) => {
                let moved = store
                    .move_endpoint(&id, read, event, ts(T0 + 5))
                    .await
                    .unwrap();
                assert_eq!(
                    moved,
                    read == cur,
                    "{id}: {} from {} (now {})",
                    event.name(),
                    read.as_str(),
                    cur.as_str()
                );
                if moved {
                    to
                } else {
                    cur
                }
            }
            (Err(_), _) => {
                assert!(matches!(
                    store.move_endpoint(&id, read, event, ts(T0 + 5)).await,
                    Err(StoreError::IllegalTransition(_))
                ));
                cur
            }
        };
        let got = store.get_endpoint(&id).await.unwrap().unwrap().state;
        assert_eq!(
            got,
            want,
            "{id}: store and machine disagree after {}",
            event.name()
        );
        history.push(got);
    }
    assert_ends_stay(&history, endpoint_lifecycle::is_final);
}

/// Ops: the gateway's move (`next`, then `update_op` with a compare-and-set on the state read).
async fn run_op(store: &Store, seq: Vec<(OpEvent, usize)>) {
    let id = fresh_id("op");
    store.insert_op(&op_row(&id)).await.unwrap();
    let mut history = vec![OpState::PendingApproval];
    for (event, lag) in seq {
        let cur = *history.last().unwrap();
        let read = read_at(&history, lag);
        let mut row = store.get_op(&id).await.unwrap().unwrap();
        let want = match lifecycle::next(read, &event) {
            Ok(to) => {
                row.state = to;
                let moved = store.update_op(&row, read).await.unwrap();
                assert_eq!(
                    moved,
                    read == cur,
                    "{id}: {} from {} (now {})",
                    event.name(),
                    read.as_str(),
                    cur.as_str()
                );
                if moved {
                    to
                } else {
                    cur
                }
            }
            // Nothing the machine refuses reaches the store from the gateway; an ended op is
            // refused by the store itself, whatever it is asked to become.
            Err(_) if read.is_final() => {
                row.state = OpState::PendingApproval;
                assert!(matches!(
                    store.update_op(&row, read).await,
                    Err(StoreError::IllegalTransition(_))
                ));
                cur
            }
            Err(_) => cur,
        };
        let got = store.get_op(&id).await.unwrap().unwrap().state;
        assert_eq!(
            got,
            want,
            "{id}: store and machine disagree after {}",
            event.name()
        );
        history.push(got);
    }
    assert_ends_stay(&history, OpState::is_final);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn grants_in_the_store_follow_the_machine_and_never_leave_an_end(seq in steps(grant_events())) {
        let s = shared();
        s.rt.block_on(run_grant(&s.store, seq));
    }

    #[test]
    fn endpoints_in_the_store_follow_the_machine_and_never_leave_an_end(seq in steps(endpoint_events())) {
        let s = shared();
        s.rt.block_on(run_endpoint(&s.store, seq));
    }

    #[test]
    fn ops_in_the_store_follow_the_machine_and_never_leave_an_end(seq in steps(op_events())) {
        let s = shared();
        s.rt.block_on(run_op(&s.store, seq));
    }
}

/// Two replicas (two pools on one database) race, many times: a retire of a pending endpoint
/// against its approval, and two approvers deciding one grant. Exactly one move wins each race,
/// and a retired endpoint is never active afterwards.
async fn replicas_race(url: &str) {
    let a = Store::open(url).await.unwrap();
    let b = Store::open(url).await.unwrap();
    a.insert_appliance(&appliance("ap_1")).await.unwrap();
    for i in 0..20 {
        let ep = format!("ep_race_{i}");
        a.insert_endpoint(&endpoint_row(&ep)).await.unwrap();
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (b1, b2, a2, ep1, ep2) = (barrier.clone(), barrier, a.clone(), ep.clone(), ep.clone());
        let retire = tokio::spawn(async move {
            b1.wait().await;
            a2.move_endpoint(
                &ep1,
                EndpointState::PendingApproval,
                EndpointEvent::Retire,
                ts(T0 + 1),
            )
            .await
            .unwrap()
        });
        let bb = b.clone();
        let approve = tokio::spawn(async move {
            b2.wait().await;
            bb.activate_endpoint(&ep2, ts(T0 + 60_000), "127.0.0.1:1")
                .await
                .unwrap()
        });
        let (retired, approved) = (retire.await.unwrap(), approve.await.unwrap());
        assert!(
            retired ^ approved,
            "exactly one wins: retired {retired}, approved {approved}"
        );
        let state = b.get_endpoint(&ep).await.unwrap().unwrap().state;
        assert_eq!(
            state,
            if retired {
                EndpointState::Retired
            } else {
                EndpointState::Active
            }
        );
        // The loser, retrying from what it sees now, is refused by the machine.
        if retired {
            assert!(endpoint_lifecycle::next(state, EndpointEvent::Approve).is_err());
            assert!(!b
                .activate_endpoint(&ep, ts(T0 + 60_000), "127.0.0.1:1")
                .await
                .unwrap());
        }

        let gr = format!("gr_race_{i}");
        a.insert_grant(&grant_row(&gr)).await.unwrap();
        let change = |by| GrantChange {
            by,
            at: ts(T0 + 2),
            message: None,
            expires_at: Some(ts(T0 + 2 + GRANT_MS)),
        };
        let (x, y) = tokio::join!(
            a.move_grant(
                &gr,
                GrantState::PendingApproval,
                GrantEvent::Approve,
                change("ana")
            ),
            b.move_grant(
                &gr,
                GrantState::PendingApproval,
                GrantEvent::Deny,
                change("bob")
            ),
        );
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(x ^ y, "exactly one decision: approve {x}, deny {y}");
        let g = a.get_grant(&gr).await.unwrap().unwrap();
        assert_eq!(
            g.state,
            if x {
                GrantState::Active
            } else {
                GrantState::Denied
            }
        );
        assert_eq!(g.decided_by.as_deref(), Some(if x { "ana" } else { "bob" }));
    }
    // An expired grant cannot be revoked, even though its stored state is still `active`.
    let gr = "gr_expired";
    a.insert_grant(&grant_row(gr)).await.unwrap();
    let at = |ms| GrantChange {
        by: "ana",
        at: ts(ms),
        message: None,
        expires_at: Some(ts(T0 + GRANT_MS)),
    };
    assert!(a
        .move_grant(gr, GrantState::PendingApproval, GrantEvent::Approve, at(T0))
        .await
        .unwrap());
    assert!(!b
        .move_grant(
            gr,
            GrantState::Active,
            GrantEvent::Revoke,
            at(T0 + GRANT_MS)
        )
        .await
        .unwrap());
    assert!(b
        .move_grant(
            gr,
            GrantState::Active,
            GrantEvent::Revoke,
            at(T0 + GRANT_MS - 1)
        )
        .await
        .unwrap());
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_race_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    replicas_race(&format!(
        "sqlite:{}",
        dir.path().join("postern.db").display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_race_on_postgres() {
    let cluster = postern::pg_cluster::shared();
    let url = cluster.create_database("lifecycle_replicas_race");
    replicas_race(&url).await;
}
