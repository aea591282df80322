use super::*;
use crate::api::{ChainVerifier, AUDIT_GENESIS_HASH};

// Not real crypto: a keyed checksum is enough to exercise which heads are accepted.
fn fake_hash(b: &[u8]) -> String {
    let mut h: u64 = 1469598103934665603;
    for x in b {
        h = (h ^ *x as u64).wrapping_mul(1099511628211);
    }
    format!("{h:016x}")
}

fn fake_sign(key: &str, bytes: &[u8]) -> String {
    fake_hash(&[key.as_bytes(), bytes].concat())
}

struct Keys {
    own: &'static str,
    peer: &'static str,
}

impl HeadKeys for Keys {
    fn own(&self, head: &SignedHead) -> Result<(), String> {
        (fake_sign(self.own, &head.signed_bytes()) == head.signature)
            .then_some(())
            .ok_or_else(|| "bad signature".into())
    }
    fn peer(&self, anchor: &Anchor) -> Result<(), String> {
        (fake_sign(self.peer, &anchor.head.signed_bytes()) == anchor.head.signature)
            .then_some(())
            .ok_or_else(|| "bad signature".into())
    }
}

const KEYS: Keys = Keys {
    own: "appliance-key",
    peer: "gateway-key",
};

fn time(seq: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + seq).unwrap()
}

fn head(side: TrailSide, key: &str, seq: i64, prev_hash: &str) -> SignedHead {
    let appliance_id = (side == TrailSide::Appliance).then(|| "ap_1".to_string());
    let bytes = signed_bytes(side, appliance_id.as_deref(), seq, prev_hash, &time(seq));
    SignedHead {
        trail: side,
        appliance_id,
        seq,
        prev_hash: prev_hash.into(),
        time: time(seq),
        signature: fake_sign(key, &bytes),
        key: key.into(),
    }
}

/// An appliance trail of `n` records with a head every `every` records (the head's own record
/// counts) and a gateway anchor at seq 3.
fn trail(n: i64, every: i64) -> Vec<AuditRecord> {
    let mut prev = AUDIT_GENESIS_HASH.to_string();
    (1..=n)
        .map(|seq| {
            let (kind, detail) = if seq % every == 0 {
                let h = head(TrailSide::Appliance, KEYS.own, seq, &prev);
                (HEAD_KIND, serde_json::to_value(h).unwrap())
            } else if seq == 3 {
                let a = Anchor {
                    head: head(TrailSide::Gateway, KEYS.peer, 77, "ab"),
                    certificate: None,
                };
                (ANCHOR_KIND, serde_json::to_value(a).unwrap())
            } else {
                ("session.opened", serde_json::json!({ "n": seq }))
            };
            let mut r = AuditRecord {
                seq,
                time: time(seq),
                kind: kind.into(),
                actor: "agent:ap_1".into(),
                appliance_id: Some("ap_1".into()),
                endpoint_id: None,
                session_id: None,
                op_id: None,
                detail,
                prev_hash: prev.clone(),
                hash: String::new(),
            };
            r.hash = fake_hash(&r.chain_input());
            prev = r.hash.clone();
            r
        })
        .collect()
}

fn last_head(records: &[AuditRecord]) -> SignedHead {
    let r = records.iter().rev().find(|r| r.kind == HEAD_KIND).unwrap();
    serde_json::from_value(r.detail.clone()).unwrap()
}

fn outside(h: SignedHead) -> Vec<OutsideHead> {
    vec![OutsideHead {
        head: h,
        source: "head file".into(),
    }]
}

/// Chain, then heads: the order `audit verify` checks in.
fn check(records: &[AuditRecord], outside: Vec<OutsideHead>) -> Result<HeadSummary, HeadFailure> {
    let mut chain = ChainVerifier::new();
    let mut heads = HeadVerifier::new(TrailSide::Appliance, outside);
    for r in records {
        chain
            .push(r, fake_hash)
            .map_err(|seq| HeadFailure::Record {
                seq,
                reason: "chain".into(),
            })?;
        heads.push(r, &KEYS)?;
    }
    heads.finish()
}

#[test]
fn an_intact_trail_verifies_against_its_latest_head() {
    let t = trail(25, 10);
    let s = check(&t, outside(last_head(&t))).unwrap();
    assert_eq!((s.heads, s.anchors), (2, 1));
    assert_eq!(s.last_head.unwrap().seq, 20);
    assert_eq!(s.compared_with, ["head file"]);
}

#[test]
fn cutting_the_tail_through_the_last_head_names_that_head() {
    let t = trail(25, 10);
    let head = last_head(&t);
    for keep in [19, 15, 0] {
        match check(&t[..keep], outside(head.clone())) {
            Err(HeadFailure::Missing {
                head: missing,
                trail_ends_at,
                ..
            }) => {
                assert_eq!(missing.seq, 20);
                assert_eq!(trail_ends_at, keep as i64);
            }
            other => panic!("keeping {keep}: expected the head to be missing, got {other:?}"),
        }
    }
    // Without a head from outside, a cut at a head is indistinguishable from a short trail.
    assert!(check(&t[..19], vec![]).is_ok());
}

#[test]
fn a_shorter_valid_chain_in_place_of_the_trail_names_the_head() {
    let t = trail(25, 10);
    let head = last_head(&t);
    // Another, fully valid trail that is longer than the head's seq but different.
    let mut other = trail(30, 7);
    other.truncate(22);
    let f = check(&other, outside(head.clone())).unwrap_err();
    assert_eq!(f.seq(), 20);
    assert!(f.message().contains("is not that head"), "{}", f.message());
    // And a shorter one.
    let f = check(&trail(12, 5), outside(head)).unwrap_err();
    assert!(
        matches!(
            f,
            HeadFailure::Missing {
                trail_ends_at: 12,
                ..
            }
        ),
        "{f:?}"
    );
}

#[test]
fn forged_moved_or_foreign_heads_name_their_record() {
    let mut t = trail(25, 10);
    // A head signed with another key.
    let forged = head(TrailSide::Appliance, "mallory", 10, &t[9].prev_hash);
    t[9].detail = serde_json::to_value(forged).unwrap();
    t[9].hash = fake_hash(&t[9].chain_input());
    // (Relink the chain after it so only the head check fails.)
    relink(&mut t, 10);
    assert_eq!(check(&t, vec![]).unwrap_err().seq(), 10);

    // A genuine head copied to another position.
    let mut t = trail(25, 10);
    t[14].kind = HEAD_KIND.into();
    t[14].detail = t[9].detail.clone();
    relink(&mut t, 14);
    let f = check(&t, vec![]).unwrap_err();
    assert_eq!(f.seq(), 15);
    assert!(f.message().contains("moved"), "{}", f.message());

    // A gateway anchor whose signature is not the gateway's.
    let mut t = trail(25, 10);
    let mut a: Anchor = serde_json::from_value(t[2].detail.clone()).unwrap();
    a.head.seq += 1;
    t[2].detail = serde_json::to_value(a).unwrap();
    relink(&mut t, 2);
    let f = check(&t, vec![]).unwrap_err();
    assert_eq!(f.seq(), 3);
    assert!(f.message().contains("anchored head"), "{}", f.message());
}

#[test]
fn a_forged_outside_head_does_not_pass_for_the_real_one() {
    let t = trail(25, 10);
    let mut h = last_head(&t);
    h.signature = "AAAA".into();
    assert!(matches!(
        check(&t, outside(h)),
        Err(HeadFailure::Missing { .. })
    ));
}

fn relink(t: &mut [AuditRecord], from: usize) {
    for i in from..t.len() {
        if i > 0 {
            t[i].prev_hash = t[i - 1].hash.clone();
        }
        if t[i].kind == HEAD_KIND && i != from {
            let h = head(TrailSide::Appliance, KEYS.own, t[i].seq, &t[i].prev_hash);
            t[i].detail = serde_json::to_value(h).unwrap();
        }
        t[i].hash = fake_hash(&t[i].chain_input());
    }
}

#[test]
fn the_cadence_heads_every_hundred_records_or_a_minute_of_activity() {
    let t0 = std::time::Instant::now();
    let mut c = HeadCadence::new(t0);
    for _ in 0..99 {
        c.wrote("sql.statement");
    }
    assert!(!c.due(t0));
    c.wrote(HEAD_KIND);
    assert!(!c.due(t0), "heads do not count");
    c.wrote("sql.statement");
    assert!(c.due(t0));
    c.headed(t0);
    assert!(!c.pending());
    // Anchors alone never make the timer due: idle trails do not answer heads with heads.
    c.wrote(ANCHOR_KIND);
    assert!(!c.due(t0 + HEAD_EVERY * 2));
    assert!(c.pending());
    c.wrote("session.opened");
    assert!(!c.due(t0 + HEAD_EVERY / 2));
    assert!(c.due(t0 + HEAD_EVERY));
}
