//! The appliance's check of a person's approval of a grant or an endpoint.
//!
//! Same keys, statements and refusals as an op's command (`crate::approval_check`): when
//! `agent.toml` lists `[[approver]]` keys and the appliance's own policy reserves the grant or
//! endpoint for a person, it is honoured only with a decision one of those keys signed for
//! exactly it. One difference: the gateway sends the grant set again after every change and on
//! every reconnect, and announces every live endpoint again on reconnect. So a decision is
//! accepted once — checked and used up as an op's is — and the acceptance is remembered per
//! record id, on disk beside the trail (`<audit_path>.approvals-accepted`) until the grant or
//! endpoint ends. Announced again with the same decision, it is checked again as of its
//! acceptance (key, signature, appliance, record, content) but neither used up again nor held
//! to the statement's validity: a grant may last longer than a statement's 24 h. Announced
//! with other content (level, duration, type, resource, TTL), the decision no longer binds it
//! and it is refused; a changed grant needs a new decision.

use crate::{
    approval_check::{denied_entry, verified_entry, SignedApprovals},
    audit::Entry,
    config::AgentConfig,
};
use certs::approver::{statement_digest, Verified};
use endpoint_types::{
    approval::{ApprovalInvalid, DecidedContent, SignedDecision, CLOCK_SKEW},
    control::GrantLevel,
    frame::{EndpointGrant, LiveGrant},
    policy::{Decision, Policy},
    resource::PolicySummary,
    ApiError,
};
use jiff::{SignedDuration, Timestamp};
use std::{
    collections::HashMap,
    io::Write as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

/// The longest record id remembered: ids are the gateway's `gr_…` / `ep_…`.
const MAX_RECORD_ID_LEN: usize = 128;
/// How many refusals are remembered so that one announced again is not recorded again.
const REMEMBERED_REFUSALS: usize = 4096;

/// A grant or endpoint the gateway announces, as a person's decision binds it.
pub trait Approvable {
    /// `grant` or `endpoint`: the stage in the trail's records.
    const STAGE: &'static str;
    fn record_id(&self) -> &str;
    fn expires_at(&self) -> Timestamp;
    fn signed(&self) -> Option<&SignedDecision>;
    /// What the appliance is asked to honour, in a statement's terms.
    fn asked(&self) -> DecidedContent;
    /// Names the record in a trail entry.
    fn tag(&self, entry: Entry) -> Entry;
    /// The phase whose policy decides it: a grant's level, an endpoint's phase.
    fn phase(&self) -> GrantLevel;
}

impl Approvable for LiveGrant {
    const STAGE: &'static str = "grant";
    fn record_id(&self) -> &str {
        &self.grant_id
    }
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
    fn signed(&self) -> Option<&SignedDecision> {
        self.signed_decision.as_ref()
    }
    fn asked(&self) -> DecidedContent {
        DecidedContent::Grant {
            level: self.level,
            duration_s: asked_lifetime_s(self.signed(), self.expires_at),
        }
    }
    fn tag(&self, mut entry: Entry) -> Entry {
        entry.detail["grant_id"] = self.grant_id.clone().into();
        entry
    }
    fn phase(&self) -> GrantLevel {
        self.level
    }
}

impl Approvable for EndpointGrant {
    const STAGE: &'static str = "endpoint";
    fn record_id(&self) -> &str {
        &self.endpoint_id
    }
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
    fn signed(&self) -> Option<&SignedDecision> {
        self.signed_decision.as_ref()
    }
    fn asked(&self) -> DecidedContent {
        DecidedContent::Endpoint {
            endpoint_type: self.endpoint_type,
            resource_id: self.resource_id.clone(),
            ttl_s: asked_lifetime_s(self.signed(), self.expires_at),
        }
    }
    fn tag(&self, entry: Entry) -> Entry {
        entry.endpoint(self.endpoint_id.clone())
    }
    fn phase(&self) -> GrantLevel {
        self.phase
    }
}

/// How long, in a statement's terms, the appliance is asked to honour something that ends at
/// `expires_at`: from the statement's issue to then. The gateway starts the clock when it
/// records the decision, a moment after the approver signed it (and the approver's clock may
/// run a little behind): up to [`CLOCK_SKEW`] past the signed lifetime counts as the signed
/// lifetime, anything longer as what it is, which then differs from what was signed.
pub fn asked_lifetime_s(signed: Option<&SignedDecision>, expires_at: Timestamp) -> u64 {
    let Some(s) = signed else {
        return 0;
    };
    let signed_s = match &s.statement.content {
        DecidedContent::Grant { duration_s, .. } => *duration_s,
        DecidedContent::Endpoint { ttl_s, .. } => *ttl_s,
        // Another kind of statement is refused for its kind whatever this says.
        _ => return 0,
    };
    let asked = expires_at.duration_since(s.statement.issued_at);
    let allowed = SignedDuration::from_secs(i64::try_from(signed_s).unwrap_or(i64::MAX))
        .checked_add(CLOCK_SKEW)
        .unwrap_or(SignedDuration::MAX);
    if asked <= allowed {
        signed_s
    } else {
        // Rounded up: a lifetime longer than signed never rounds down to the signed one.
        let secs = asked.as_secs() + i64::from(asked.subsec_nanos() > 0);
        u64::try_from(secs).unwrap_or(u64::MAX)
    }
}

/// Whether the appliance's own policy leaves a grant or endpoint that ends at `expires_at` to a
/// person, judged at `now`: `automatic` never does; a window approves only what ends with the
/// windows open now (the gateway caps what a window approved at its close, so whatever outlives
/// it was not the window's decision); otherwise a person decides. An unusable policy (none
/// parses for a loaded config) leaves everything to a person.
pub fn reserved_for_person(policy: Option<&Policy>, expires_at: Timestamp, now: Timestamp) -> bool {
    match policy.map(|p| p.evaluate(now)) {
        Some(Decision::Automatic) => false,
        Some(Decision::InWindow { closes_at }) => expires_at > closes_at,
        Some(Decision::NeedsPerson) | None => true,
    }
}

/// A decision this appliance accepted for a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The statement's [`statement_digest`].
    pub digest: [u8; 32],
    pub at: Timestamp,
    /// When the grant or endpoint ends (as announced at acceptance): forgotten after.
    pub until: Timestamp,
}

/// The accepted decisions per record id: pure state, `now` passed in.
#[derive(Debug, Default)]
pub struct Acceptances {
    by_record: HashMap<String, Accepted>,
}

impl Acceptances {
    /// When the decision with `digest` was accepted for `record_id`, if it was.
    pub fn accepted_at(&self, record_id: &str, digest: &[u8; 32]) -> Option<Timestamp> {
        self.by_record
            .get(record_id)
            .filter(|a| &a.digest == digest)
            .map(|a| a.at)
    }

    pub fn insert(&mut self, record_id: String, accepted: Accepted) {
        self.by_record.insert(record_id, accepted);
    }

    /// Forgets what ended before `now`; whether anything was forgotten.
    pub fn forget_ended(&mut self, now: Timestamp) -> bool {
        let before = self.by_record.len();
        self.by_record.retain(|_, a| a.until >= now);
        self.by_record.len() < before
    }

    pub fn len(&self) -> usize {
        self.by_record.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_record.is_empty()
    }

    fn lines(&self) -> String {
        self.by_record
            .iter()
            .map(|(id, a)| accepted_line(id, a))
            .collect()
    }
}

/// `record_id digest-hex accepted_at until` per line.
fn accepted_line(record_id: &str, a: &Accepted) -> String {
    let hex: String = a.digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{record_id} {hex} {} {}\n", a.at, a.until)
}

fn parse_accepted(line: &str) -> Option<(String, Accepted)> {
    let mut parts = line.split_whitespace();
    let id = parts.next()?;
    let hex = parts.next()?;
    let at = parts.next()?.parse().ok()?;
    let until = parts.next()?.parse().ok()?;
    if hex.len() != 64 || parts.next().is_some() {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((id.to_string(), Accepted { digest, at, until }))
}

/// A record id that fits one line of the acceptance file.
fn plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_RECORD_ID_LEN
        && !id.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// What the announcement of grants or endpoints comes to: what to honour, what to record in the
/// customer trail, and what to report to the gateway as refused.
#[derive(Debug)]
pub struct Screened<T> {
    pub kept: Vec<T>,
    pub records: Vec<Entry>,
    /// (record id, `APPROVAL_INVALID`) for each refused one.
    pub refused: Vec<(String, ApiError)>,
}

/// The appliance's policy and the decisions it accepted for grants and endpoints.
pub struct RecordApprovals {
    /// `[policy]` with its `[policy.<phase>]` tables: each record is judged by its phase's.
    policy: PolicySummary,
    accepted: Mutex<Acceptances>,
    /// (record id, reason) of the refusals recorded in this process: a gateway that keeps
    /// announcing a refused grant gets the refusal reported each time, the trail one record.
    recorded_refusals: Mutex<std::collections::HashSet<(String, &'static str)>>,
    /// Where acceptances are remembered across restarts (absent: no approvers, nothing to keep).
    file: Option<PathBuf>,
}

impl std::fmt::Debug for RecordApprovals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RecordApprovals({:?})", self.file)
    }
}

/// `<audit_path>.approvals-accepted`.
pub fn accepted_path(audit_path: &Path) -> PathBuf {
    let mut name = audit_path.as_os_str().to_owned();
    name.push(".approvals-accepted");
    PathBuf::from(name)
}

impl RecordApprovals {
    /// From the loaded (validated) config; acceptances of what has not ended by `now` are read
    /// back, and the file keeps only those.
    pub fn from_config(config: &AgentConfig, now: Timestamp) -> RecordApprovals {
        let policy = config.policy_summary();
        let listed = !config.approvers.is_empty();
        let file = listed.then(|| accepted_path(&config.audit_path));
        let mut accepted = Acceptances::default();
        let mut read = 0;
        if let Some(path) = &file {
            for (id, a) in std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter_map(parse_accepted)
            {
                read += 1;
                accepted.insert(id, a);
            }
            if accepted.forget_ended(now) || accepted.len() < read {
                if let Err(e) = std::fs::write(path, accepted.lines()) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot compact the accepted approvals");
                }
            }
        }
        RecordApprovals {
            policy,
            accepted: Mutex::new(accepted),
            recorded_refusals: Mutex::default(),
            file,
        }
    }

    /// Splits what the gateway announced into what the appliance honours and what it refuses.
    /// `actor` names who the trail records a decision against.
    pub fn screen<T: Approvable>(
        &self,
        approvals: &SignedApprovals,
        items: Vec<T>,
        actor: &str,
        now: Timestamp,
    ) -> Screened<T> {
        let mut out = Screened {
            kept: Vec::with_capacity(items.len()),
            records: Vec::new(),
            refused: Vec::new(),
        };
        for item in items {
            match self.check(approvals, &item, now) {
                Ok(None) => out.kept.push(item),
                Ok(Some((verified, first))) => {
                    if let (true, Some(signed)) = (first, item.signed()) {
                        out.records.push(item.tag(verified_entry(
                            actor,
                            T::STAGE,
                            &verified,
                            signed,
                        )));
                    }
                    out.kept.push(item);
                }
                Err(why) => {
                    if self.first_refusal(item.record_id(), why.reason()) {
                        tracing::warn!(record = %item.record_id(), reason = why.reason(), "refused a {} a person was said to approve: {why}", T::STAGE);
                        out.records.push(item.tag(denied_entry(
                            actor,
                            T::STAGE,
                            item.signed(),
                            &why,
                        )));
                    }
                    let mut error = why.to_api_error();
                    error.details["record_id"] = item.record_id().into();
                    error.details["stage"] = T::STAGE.into();
                    out.refused.push((item.record_id().to_string(), error));
                }
            }
        }
        out
    }

    /// Ok(None): nothing to verify (no keys listed, or the policy decides by itself).
    /// Ok(Some((verified, first))): a valid decision, `first` when accepted just now.
    pub fn check<T: Approvable>(
        &self,
        approvals: &SignedApprovals,
        item: &T,
        now: Timestamp,
    ) -> Result<Option<(Verified, bool)>, ApprovalInvalid> {
        if !approvals.enforced() || !self.reserved(item.phase(), item.expires_at(), now) {
            return Ok(None);
        }
        let signed = item.signed().ok_or(ApprovalInvalid::Missing)?;
        let id = item.record_id();
        if !plain_id(id) {
            return Err(ApprovalInvalid::Malformed(format!(
                "the {} id is not 1 to {MAX_RECORD_ID_LEN} printable characters",
                T::STAGE
            )));
        }
        let asked = item.asked();
        let digest = statement_digest(&signed.statement);
        let accepted_at = self.lock().accepted_at(id, &digest);
        if let Some(at) = accepted_at {
            return approvals
                .recheck(signed, id, &asked, at)
                .map(|v| Some((v, false)));
        }
        let verified = approvals
            .verify(Some(signed), id, &asked, now)?
            .ok_or(ApprovalInvalid::Missing)?;
        let accepted = Accepted {
            digest,
            at: now,
            until: item.expires_at(),
        };
        let mut all = self.lock();
        all.forget_ended(now);
        all.insert(id.to_string(), accepted);
        drop(all);
        self.remember(id, &accepted);
        Ok(Some((verified, true)))
    }

    /// Whether the policy of `phase` leaves what ends at `expires_at` to a person (install:
    /// always).
    fn reserved(&self, phase: GrantLevel, expires_at: Timestamp, now: Timestamp) -> bool {
        endpoint_types::phase::always_needs_person(phase)
            || reserved_for_person(
                endpoint_types::phase_policy::policy_for(&self.policy, phase).as_ref(),
                expires_at,
                now,
            )
    }

    /// Whether this refusal of `record_id` is new to this process (and so goes to the trail).
    fn first_refusal(&self, record_id: &str, reason: &'static str) -> bool {
        let mut seen = self
            .recorded_refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REMEMBERED_REFUSALS {
            seen.clear();
        }
        seen.insert((record_id.to_string(), reason))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Acceptances> {
        self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends the acceptance before the grant or endpoint is honoured; like a used statement
    /// (`approval_check`), written but not fsynced. A failure is logged: the acceptance holds
    /// for this process's life, and after a restart the decision is refused as `replayed`
    /// (fail closed) until a person decides again.
    fn remember(&self, id: &str, accepted: &Accepted) {
        let Some(path) = &self.file else {
            return;
        };
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(accepted_line(id, accepted).as_bytes()));
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot record an accepted approval; after a restart it would be refused as replayed");
        }
    }
}

#[cfg(test)]
#[path = "record_approval_tests.rs"]
mod tests;
