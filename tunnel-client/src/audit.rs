//! The customer's trail: append-only JSON lines, hash-chained so an edited, deleted or
//! reordered record is detected by `postern-agent audit verify`.

use endpoint_types::api::{AuditRecord, ChainFields, AUDIT_GENESIS_HASH};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::value::RawValue;
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot use the audit trail {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the audit trail {} is broken at seq {seq}: {reason}", path.display())]
    Broken {
        path: PathBuf,
        seq: i64,
        reason: String,
    },
}

impl AuditError {
    pub fn to_api_error(&self) -> endpoint_types::ApiError {
        use endpoint_types::{ApiError, ErrorCode};
        match self {
            AuditError::Io { .. } => ApiError::new(ErrorCode::Internal, self.to_string())
                .hint("check audit_path in agent.toml and the agent's permissions on it"),
            AuditError::Broken { seq, .. } => ApiError::new(ErrorCode::AuditChainBroken, self.to_string())
                .hint("a record was edited, deleted or reordered at or just before this seq; keep a copy of the file for investigation")
                .details(serde_json::json!({ "seq": seq })),
        }
    }
}

/// One thing to record; `seq`, `time` and the hashes are filled in by the log.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: &'static str,
    pub actor: String,
    pub endpoint_id: Option<String>,
    pub session_id: Option<String>,
    pub op_id: Option<String>,
    pub detail: serde_json::Value,
}

impl Entry {
    pub fn new(kind: &'static str, actor: impl Into<String>, detail: serde_json::Value) -> Self {
        Entry {
            kind,
            actor: actor.into(),
            endpoint_id: None,
            session_id: None,
            op_id: None,
            detail,
        }
    }

    pub fn endpoint(mut self, id: impl Into<String>) -> Self {
        self.endpoint_id = Some(id.into());
        self
    }

    pub fn session(mut self, id: impl Into<String>) -> Self {
        self.session_id = Some(id.into());
        self
    }

    pub fn op(mut self, id: impl Into<String>) -> Self {
        self.op_id = Some(id.into());
        self
    }
}

/// What a record is about, borrowed.
struct Fields<'a> {
    kind: &'static str,
    actor: &'a str,
    endpoint_id: Option<&'a str>,
    session_id: Option<&'a str>,
    op_id: Option<&'a str>,
}

/// One line of the trail: the fields of [`AuditRecord`], in its order, borrowed.
#[derive(Serialize)]
struct Line<'a, D: Serialize + ?Sized> {
    seq: i64,
    time: &'a Timestamp,
    kind: &'a str,
    actor: &'a str,
    appliance_id: Option<&'a str>,
    endpoint_id: Option<&'a str>,
    session_id: Option<&'a str>,
    op_id: Option<&'a str>,
    detail: &'a D,
    prev_hash: &'a str,
    hash: &'a str,
}

impl<D: Serialize + ?Sized> Line<'_, D> {
    /// What `hash` is taken over: the same bytes as [`AuditRecord::chain_input`] of the record.
    fn chain_input(&self) -> Vec<u8> {
        ChainFields {
            seq: self.seq,
            time: &self.time.to_string(),
            kind: self.kind,
            actor: self.actor,
            appliance_id: self.appliance_id,
            endpoint_id: self.endpoint_id,
            session_id: self.session_id,
            op_id: self.op_id,
            detail: self.detail,
            prev_hash: self.prev_hash,
        }
        .chain_input()
    }
}

/// Cheap to clone; every clone appends to the same chain under one lock, so the chain stays
/// linear however many sessions write at once.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Mutex<Chain>>,
    appliance_id: Option<String>,
}

struct Chain {
    path: PathBuf,
    file: File,
    next_seq: i64,
    prev_hash: String,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

impl AuditLog {
    /// Opens (creating if needed) the trail and continues the chain from its last record.
    pub fn open(path: &Path, appliance_id: Option<String>) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut options = OpenOptions::new();
        options.read(true).append(true).create(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(io)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        let (next_seq, prev_hash) = match text.lines().rev().find(|l| !l.trim().is_empty()) {
            None => (1, AUDIT_GENESIS_HASH.to_string()),
            Some(last) => {
                // Appending after a damaged last line would bury the damage under valid-looking
                // records; refuse instead and let the customer look.
                let r: AuditRecord =
                    serde_json::from_str(last).map_err(|e| AuditError::Broken {
                        path: path.to_path_buf(),
                        seq: 0,
                        reason: format!(
                            "its last line is not a record ({e}); run `postern-agent audit verify`"
                        ),
                    })?;
                (r.seq + 1, r.hash)
            }
        };
        if !text.is_empty() && !text.ends_with('\n') {
            file.write_all(b"\n").map_err(io)?;
        }
        Ok(AuditLog {
            inner: Arc::new(Mutex::new(Chain {
                path: path.to_path_buf(),
                file,
                next_seq,
                prev_hash,
            })),
            appliance_id,
        })
    }

    pub fn appliance_id(&self) -> Option<&str> {
        self.appliance_id.as_deref()
    }

    /// The actor of records the agent makes on its own behalf.
    pub fn agent_actor(&self) -> String {
        format!(
            "agent:{}",
            self.appliance_id.as_deref().unwrap_or("unenrolled")
        )
    }

    pub fn record(&self, entry: Entry) -> Result<AuditRecord, AuditError> {
        let fields = Fields {
            kind: entry.kind,
            actor: &entry.actor,
            endpoint_id: entry.endpoint_id.as_deref(),
            session_id: entry.session_id.as_deref(),
            op_id: entry.op_id.as_deref(),
        };
        let (seq, time, prev_hash, hash) = self.append(&fields, &entry.detail)?;
        Ok(AuditRecord {
            seq,
            time,
            kind: entry.kind.to_string(),
            actor: entry.actor,
            appliance_id: self.appliance_id.clone(),
            endpoint_id: entry.endpoint_id,
            session_id: entry.session_id,
            op_id: entry.op_id,
            detail: entry.detail,
            prev_hash,
            hash,
        })
    }

    /// A session's record whose detail is already JSON text (a statement, made on the message
    /// path without a `Value`): the same line [`AuditLog::record`] writes for that detail.
    pub fn record_json(
        &self,
        kind: &'static str,
        actor: &str,
        endpoint_id: &str,
        session_id: &str,
        detail: &RawValue,
    ) -> Result<(), AuditError> {
        let fields = Fields {
            kind,
            actor,
            endpoint_id: Some(endpoint_id),
            session_id: Some(session_id),
            op_id: None,
        };
        self.append(&fields, detail).map(|_| ())
    }

    /// Chains and writes one line; returns `(seq, time, prev_hash, hash)`.
    fn append<D: Serialize + ?Sized>(
        &self,
        f: &Fields<'_>,
        detail: &D,
    ) -> Result<(i64, Timestamp, String, String), AuditError> {
        // A poisoned lock only means another writer panicked mid-call; the chain state is
        // updated after the write succeeds, so it is still consistent.
        let mut chain = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let time = Timestamp::now();
        let seq = chain.next_seq;
        // Field for field what serialising an `AuditRecord` gives, without building one.
        let mut line = Line {
            seq,
            time: &time,
            kind: f.kind,
            actor: f.actor,
            appliance_id: self.appliance_id.as_deref(),
            endpoint_id: f.endpoint_id,
            session_id: f.session_id,
            op_id: f.op_id,
            detail,
            prev_hash: &chain.prev_hash,
            hash: "",
        };
        let hash = sha256_hex(&line.chain_input());
        line.hash = &hash;
        let mut bytes = serde_json::to_vec(&line).map_err(|e| AuditError::Io {
            path: chain.path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        let Chain { path, file, .. } = &mut *chain;
        file.write_all(&bytes)
            .and_then(|()| file.flush())
            .map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
        let prev_hash = std::mem::replace(&mut chain.prev_hash, hash.clone());
        chain.next_seq += 1;
        Ok((seq, time, prev_hash, hash))
    }

    /// Records, logging instead of failing: for events where the action has already happened
    /// and refusing it afterwards would help no one.
    pub fn record_or_log(&self, entry: Entry) {
        if let Err(e) = self.record(entry) {
            tracing::error!(error = %e, "cannot write the customer's audit trail");
        }
    }
}

/// Checks the whole chain; returns how many records it holds. A missing file is an empty trail.
pub fn verify_file(path: &Path) -> Result<u64, AuditError> {
    match File::open(path) {
        Ok(f) => verify(BufReader::new(f), path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(AuditError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub fn verify<R: BufRead>(reader: R, path: &Path) -> Result<u64, AuditError> {
    let mut expected_seq: i64 = 1;
    let mut prev_hash = AUDIT_GENESIS_HASH.to_string();
    for line in reader.lines() {
        let line = line.map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let broken = |reason: String| AuditError::Broken {
            path: path.to_path_buf(),
            seq: expected_seq,
            reason,
        };
        let record: AuditRecord = serde_json::from_str(&line)
            .map_err(|e| broken(format!("line {expected_seq} is not a record: {e}")))?;
        if record.seq != expected_seq {
            return Err(broken(format!(
                "expected seq {expected_seq}, found seq {} (a record was deleted or moved)",
                record.seq
            )));
        }
        if record.prev_hash != prev_hash {
            return Err(broken(
                "prev_hash does not match the previous record's hash".into(),
            ));
        }
        if sha256_hex(&record.chain_input()) != record.hash {
            return Err(broken(
                "the record was altered (its hash does not match its contents)".into(),
            ));
        }
        prev_hash = record.hash;
        expected_seq += 1;
    }
    Ok((expected_seq - 1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn trail(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/audit.jsonl");
        let log = AuditLog::open(&path, Some("app_1".into())).unwrap();
        for i in 0..n {
            log.record(
                Entry::new("session.opened", "alice", json!({ "i": i }))
                    .endpoint("ep_1")
                    .session(format!("s{i}")),
            )
            .unwrap();
        }
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        std::fs::write(
            path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
    }

    fn broken_at(path: &Path) -> i64 {
        match verify_file(path) {
            Err(AuditError::Broken { seq, .. }) => seq,
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    /// A line is the serialised `AuditRecord`, whichever way it was written, and a detail
    /// given as JSON text chains exactly as the same `Value` would.
    #[test]
    fn lines_are_records_and_json_details_chain_like_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path, Some("app_1".into())).unwrap();
        let detail =
            json!({ "protocol": "simple", "text": "select '\u{1b}[2J\"\n'", "truncated": false });
        let r = log
            .record(
                Entry::new("sql.statement", "op", detail.clone())
                    .endpoint("ep_1")
                    .session("ses_1"),
            )
            .unwrap();
        let raw = serde_json::value::to_raw_value(&detail).unwrap();
        log.record_json("sql.statement", "op", "ep_1", "ses_1", &raw)
            .unwrap();
        let lines = lines(&path);
        assert_eq!(lines[0], serde_json::to_string(&r).unwrap());
        let second: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(
            (second.seq, &second.detail, &second.prev_hash),
            (2, &detail, &r.hash)
        );
        assert_eq!(second.appliance_id.as_deref(), Some("app_1"));
        assert_eq!(second.hash, sha256_hex(&second.chain_input()));
        assert_eq!(verify_file(&path).unwrap(), 2);
    }

    #[test]
    fn chain_verifies_and_continues_across_reopen() {
        let (_d, path) = trail(3);
        assert_eq!(verify_file(&path).unwrap(), 3);
        let log = AuditLog::open(&path, Some("app_1".into())).unwrap();
        let r = log
            .record(Entry::new("agent.connected", log.agent_actor(), json!({})))
            .unwrap();
        assert_eq!(r.seq, 4);
        assert_eq!(r.actor, "agent:app_1");
        assert_eq!(r.appliance_id.as_deref(), Some("app_1"));
        assert_eq!(verify_file(&path).unwrap(), 4);
        let first: AuditRecord = serde_json::from_str(&lines(&path)[0]).unwrap();
        assert_eq!(first.prev_hash, AUDIT_GENESIS_HASH);
        assert_eq!(first.hash.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
    }

    #[test]
    fn missing_file_is_an_empty_trail() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(verify_file(&dir.path().join("none.jsonl")).unwrap(), 0);
    }

    #[test]
    fn edited_detail_is_broken_at_that_seq() {
        let (_d, path) = trail(4);
        let mut l = lines(&path);
        l[2] = l[2].replace("\"i\":2", "\"i\":99");
        write_lines(&path, &l);
        assert_eq!(broken_at(&path), 3);
    }

    #[test]
    fn deleted_line_is_broken_at_its_seq() {
        let (_d, path) = trail(4);
        let mut l = lines(&path);
        l.remove(1);
        write_lines(&path, &l);
        assert_eq!(broken_at(&path), 2);
    }

    #[test]
    fn reordered_lines_are_broken_at_the_first_moved() {
        let (_d, path) = trail(4);
        let mut l = lines(&path);
        l.swap(2, 3);
        write_lines(&path, &l);
        assert_eq!(broken_at(&path), 3);
    }

    #[test]
    fn rehashed_edit_is_still_caught_by_the_next_link() {
        let (_d, path) = trail(3);
        let mut l = lines(&path);
        let mut r: AuditRecord = serde_json::from_str(&l[0]).unwrap();
        r.actor = "mallory".into();
        r.hash = sha256_hex(&r.chain_input());
        l[0] = serde_json::to_string(&r).unwrap();
        write_lines(&path, &l);
        assert_eq!(broken_at(&path), 2);
    }

    #[test]
    fn garbage_line_is_broken_and_blocks_appending() {
        let (_d, path) = trail(2);
        let mut l = lines(&path);
        l.push("not json".into());
        write_lines(&path, &l);
        assert_eq!(broken_at(&path), 3);
        assert!(matches!(
            AuditLog::open(&path, None),
            Err(AuditError::Broken { .. })
        ));
    }
}
