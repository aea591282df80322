//! Tunnel frames (gateway ⇄ agent) and their sans-IO codec.
//!
//! Wire form: `u32` big-endian length `L`, then `L` bytes: one version byte ([`FRAME_VERSION`])
//! followed by the frame as JSON, an object whose `type` names the frame. The length is checked
//! against the decoder's limit before anything is buffered for it, so a peer cannot make us
//! allocate past the limit.
//!
//! Each stream and direction has its own frame type, so a frame sent the wrong way does not
//! compile, and bytes of a frame that does not belong where they arrive fail to decode
//! ([`FrameError::Malformed`]) instead of reaching a run-time check:
//!
//! | stream       | agent → gateway ([`SentByAgent`]) | gateway → agent ([`SentByGateway`]) |
//! |--------------|-----------------------------------|-------------------------------------|
//! | control      | [`Handshake`], then [`ToGateway`] | [`HandshakeAnswer`], then [`ToAgent`] |
//! | data         | [`StreamAnswer`]                  | [`StreamHeader`]                    |
//! | enrollment   | [`Enrollment`]                    | [`EnrollmentAnswer`]                |
//!
//! The control stream carries its frames for the connection's life. A data stream starts with
//! one [`StreamHeader`] from the gateway and one [`StreamAnswer`] from the agent; after that it
//! carries the proxied bytes raw. The `type` names are the same across types where a frame means
//! the same thing (`heartbeat`, `error`), so the wire form is the one of a single frame set.

mod codec;
mod control;
mod payload;
mod stream;

pub use codec::{encode, encode_to_vec, FrameDecoder, FrameError};
pub use control::{AgentCommand, Handshake, HandshakeAnswer, ToAgent, ToGateway};
pub use payload::{
    EndpointGrant, Hello, HelloAck, LiveGrant, OpDispatch, OpFinished, OutputStream, StreamOpen,
};
pub use stream::{Enrollment, EnrollmentAnswer, StreamAnswer, StreamHeader};

pub const FRAME_VERSION: u8 = 1;
/// Default limit for one frame on the control stream.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;
/// Limit for the header frames of a data stream, which are small.
pub const MAX_STREAM_HEADER_LEN: usize = 16 * 1024;

mod sealed {
    pub trait Sealed {}
}

/// A frame type of the tunnel protocol: one of the types in the table above, and nothing else
/// (the trait is sealed), so the codec encodes and decodes only those.
pub trait WireFrame:
    serde::Serialize + serde::de::DeserializeOwned + sealed::Sealed + Send + 'static
{
    /// The frame's wire name (its `type`), for logs and errors.
    fn wire_name(&self) -> &'static str;
}

/// A frame the agent sends and the gateway reads. The agent's writers and the gateway's readers
/// take only these.
///
/// ```
/// use endpoint_types::frame::{SentByAgent, StreamAnswer};
/// fn agent_writes<F: SentByAgent>(_: &F) {}
/// agent_writes(&StreamAnswer::StreamAccept);
/// ```
///
/// A frame of the other direction does not compile:
///
/// ```compile_fail
/// use endpoint_types::frame::{SentByAgent, StreamHeader, StreamOpen};
/// fn agent_writes<F: SentByAgent>(_: &F) {}
/// agent_writes(&StreamHeader::StreamOpen(StreamOpen {
///     endpoint_id: "ep_1".into(),
///     session_id: "ses_1".into(),
///     resource_id: "null_resource.echo".into(),
///     operator: "bob@vendor".into(),
///     client_addr: "192.0.2.7:50000".into(),
/// }));
/// ```
pub trait SentByAgent: WireFrame {}

/// A frame the gateway sends and the agent reads. The gateway's writers and the agent's readers
/// take only these.
///
/// ```
/// use endpoint_types::frame::{SentByGateway, ToAgent};
/// fn gateway_writes<F: SentByGateway>(_: &F) {}
/// gateway_writes(&ToAgent::Heartbeat { seq: 1 });
/// ```
///
/// A frame of the other direction does not compile:
///
/// ```compile_fail
/// use endpoint_types::frame::{SentByGateway, ToGateway};
/// fn gateway_writes<F: SentByGateway>(_: &F) {}
/// gateway_writes(&ToGateway::Heartbeat { seq: 1 });
/// ```
pub trait SentByGateway: WireFrame {}

macro_rules! wire_frame {
    ($sender:ident: $($ty:ty),+) => {$(
        impl sealed::Sealed for $ty {}
        impl WireFrame for $ty {
            fn wire_name(&self) -> &'static str {
                self.name()
            }
        }
        impl $sender for $ty {}
    )+};
}

wire_frame!(SentByAgent: Handshake, ToGateway, StreamAnswer, Enrollment);
wire_frame!(SentByGateway: HandshakeAnswer, ToAgent, StreamHeader, EnrollmentAnswer);

#[cfg(test)]
mod tests;
