//! Frames that open a stream and are answered once: the header of a data stream, and the
//! enrollment exchange.

use crate::{
    api::{EnrollRequest, EnrollResponse},
    error::ApiError,
};
use serde::{Deserialize, Serialize};

use super::payload::StreamOpen;

/// Gateway → agent, the first frame of a data stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamHeader {
    StreamOpen(StreamOpen),
}

/// Agent → gateway, the answer to a data stream's header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamAnswer {
    /// The target is connected; raw bytes (or the type's own framing) follow.
    StreamAccept,
    /// Refused, with the reason; the agent finishes the stream.
    StreamRefuse(ApiError),
}

/// Agent → gateway, the one frame on an enrollment connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Enrollment {
    EnrollRequest(EnrollRequest),
}

/// Gateway → agent, the answer on an enrollment connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EnrollmentAnswer {
    EnrollResponse(EnrollResponse),
    Error(ApiError),
}

impl StreamHeader {
    pub fn name(&self) -> &'static str {
        match self {
            StreamHeader::StreamOpen(_) => "stream_open",
        }
    }
}

impl StreamAnswer {
    pub fn name(&self) -> &'static str {
        match self {
            StreamAnswer::StreamAccept => "stream_accept",
            StreamAnswer::StreamRefuse(_) => "stream_refuse",
        }
    }
}

impl Enrollment {
    pub fn name(&self) -> &'static str {
        match self {
            Enrollment::EnrollRequest(_) => "enroll_request",
        }
    }
}

impl EnrollmentAnswer {
    pub fn name(&self) -> &'static str {
        match self {
            EnrollmentAnswer::EnrollResponse(_) => "enroll_response",
            EnrollmentAnswer::Error(_) => "error",
        }
    }
}
