//! Held output on its way from the appliance to one approver's screen: fetched on demand,
//! passed through, never stored or logged.

use super::Ops;
use crate::identity::Caller;
use endpoint_types::{
    api::Role,
    control::OpState,
    frame::{Frame, OpFinished, OutputStream},
    ApiError, ErrorCode,
};
use std::{collections::HashMap, sync::Mutex};
use tokio::sync::oneshot;

/// Held output on its way from the appliance to one approver's screen; never stored.
#[derive(Debug, Default)]
pub struct Previews {
    waiting: Mutex<HashMap<String, Preview>>,
}

#[derive(Debug)]
struct Preview {
    stdout: String,
    stderr: String,
    done: oneshot::Sender<Result<serde_json::Value, ApiError>>,
}

impl Previews {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Preview>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn begin(
        &self,
        op_id: &str,
    ) -> oneshot::Receiver<Result<serde_json::Value, ApiError>> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            op_id.to_string(),
            Preview {
                stdout: String::new(),
                stderr: String::new(),
                done: tx,
            },
        );
        rx
    }

    pub(super) fn push(&self, op_id: &str, stream: OutputStream, data: &str) {
        if let Some(p) = self.lock().get_mut(op_id) {
            match stream {
                OutputStream::Stdout => p.stdout.push_str(data),
                OutputStream::Stderr => p.stderr.push_str(data),
            }
        }
    }

    pub(super) fn finish(&self, op_id: &str, result: Result<&OpFinished, ApiError>) -> bool {
        let Some(p) = self.lock().remove(op_id) else {
            return false;
        };
        let value = result.map(|f| {
            serde_json::json!({
                "stdout": p.stdout, "stderr": p.stderr, "exit_code": f.exit_code, "truncated": f.truncated,
                "timed_out": f.timed_out, "error": f.error,
            })
        });
        let _ = p.done.send(value);
        true
    }
}

impl Ops {
    /// The held output, fetched from the appliance for an approver; passed through, not kept.
    pub async fn preview(&self, caller: &Caller, id: &str) -> Result<serde_json::Value, ApiError> {
        caller.require(
            &[Role::Approver],
            "see held output (it is the customer's to release)",
        )?;
        let (row, appliance) = self.load(caller, id).await?;
        caller.require_customer(&appliance.customer)?;
        if row.state != OpState::OutputPendingApproval {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("op {id} holds no output"),
            ));
        }
        let rx = self.previews.begin(id);
        if !self.agents.send(
            &row.appliance_id,
            Frame::OutputFetch {
                op_id: id.to_string(),
            },
        ) {
            self.previews.finish(
                id,
                Err(ApiError::new(ErrorCode::ApplianceOffline, "offline")),
            );
            return Err(ApiError::new(
                ErrorCode::ApplianceOffline,
                "the held output is in the appliance, which is offline",
            ));
        }
        match tokio::time::timeout(self.preview_wait, rx).await {
            Ok(Ok(r)) => r,
            _ => {
                self.previews
                    .finish(id, Err(ApiError::internal("timed out")));
                Err(ApiError::new(
                    ErrorCode::ApplianceOffline,
                    "the appliance did not send the held output in time",
                ))
            }
        }
    }
}
