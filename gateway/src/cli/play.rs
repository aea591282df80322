//! `postern audit play SESSION`: replays an SSH session's recording from the vendor trail in
//! the terminal, with its timing (pauses shortened to `--idle-limit`). With `--output json`
//! it prints what was shown and typed instead of replaying.

use super::client::ApiClient;
use endpoint_types::{
    api::{AuditList, AuditRecord},
    asciicast::{self, EventKind},
    ApiError, ErrorCode,
};
use std::{io::Write, time::Duration};

pub fn find(records: Vec<AuditRecord>, session: &str) -> Result<AuditRecord, ApiError> {
    records
        .into_iter()
        .rfind(|r| r.kind == "ssh.recording" && r.session_id.as_deref() == Some(session))
        .ok_or_else(|| {
            ApiError::new(ErrorCode::NotFound, format!("no recording of session {session}"))
                .hint("recordings are written when an ssh session ends; `postern audit list` shows ssh.recording records and their session_id")
        })
}

pub async fn play(
    c: &ApiClient,
    session: &str,
    idle_limit: Duration,
    speed: f64,
    json: bool,
) -> Result<(), ApiError> {
    let l: AuditList = c.get("/v1/audit").await?;
    let rec = find(l.records, session)?;
    let cast = rec.detail["cast"].as_str().unwrap_or_default();
    let (header, events) = asciicast::parse(cast)
        .map_err(|e| ApiError::internal(format!("the recording of {session} is damaged: {e}")))?;
    if json {
        let v = serde_json::json!({
            "session_id": session,
            "endpoint_id": rec.endpoint_id,
            "operator": rec.detail["operator"],
            "command": rec.detail["command"],
            "width": header.width,
            "height": header.height,
            "truncated": rec.detail["truncated"],
            "events": events.len(),
            "duration_s": events.last().map(|e| e.at.as_secs_f64()).unwrap_or(0.0),
            "output": asciicast::transcript(&events, EventKind::Output),
            "input": asciicast::transcript(&events, EventKind::Input),
        });
        println!("{v}");
        return Ok(());
    }
    for step in asciicast::schedule(&events, Some(idle_limit), speed) {
        if !step.delay.is_zero() {
            tokio::time::sleep(step.delay).await;
        }
        let mut out = std::io::stdout().lock();
        if out
            .write_all(step.data.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: i64, kind: &str, session: Option<&str>) -> AuditRecord {
        AuditRecord {
            seq,
            time: jiff::Timestamp::UNIX_EPOCH,
            kind: kind.into(),
            actor: "op".into(),
            appliance_id: None,
            endpoint_id: None,
            session_id: session.map(String::from),
            op_id: None,
            detail: serde_json::json!({"seq": seq}),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn finds_the_sessions_recording_only() {
        let records = vec![
            record(1, "session.opened", Some("ses_a")),
            record(2, "ssh.recording", Some("ses_b")),
            record(3, "ssh.recording", Some("ses_a")),
            record(4, "session.closed", Some("ses_a")),
        ];
        assert_eq!(find(records.clone(), "ses_a").unwrap().seq, 3);
        assert_eq!(find(records.clone(), "ses_b").unwrap().seq, 2);
        assert_eq!(
            find(records, "ses_c").unwrap_err().code,
            ErrorCode::NotFound
        );
    }
}
