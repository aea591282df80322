//! Flow-control windows of relay connections. Every connection starts with what an enrollment
//! needs: one stream and a 64 KiB connection window, so a client without a certificate (or an
//! enrollment flood) cannot make the gateway buffer more. A tunnel connection gets the
//! windows bulk sessions need only once its certificate maps to an appliance.
//!
//! QUIC transport parameters are fixed before the ALPN (enrollment or tunnel) is known, so the
//! per-stream window stays at the tunnel's size; the connection window caps what the peer can
//! send in total until it is raised here.

use quinn::{TransportConfig, VarInt};

/// Streams an unauthenticated peer may open: the enrollment request (or the control stream).
pub const UNAUTHENTICATED_STREAMS: u32 = 1;
/// Bytes an unauthenticated peer may have in flight on the connection.
pub const UNAUTHENTICATED_WINDOW: u32 = 64 * 1024;
/// An appliance's connection: the agent opens the control stream, the data streams are the
/// gateway's. quinn reserves state per allowed stream, so a large limit costs ~300 KiB per
/// idle agent.
pub const TUNNEL_STREAMS: u32 = 8;
/// Bulk sessions need windows well above the bandwidth-delay product of a fast path.
pub const TUNNEL_WINDOW: u32 = 64 * 1024 * 1024;

/// The limits a connection starts with, before anyone is known.
pub fn start_unauthenticated(t: &mut TransportConfig) {
    t.max_concurrent_bidi_streams(VarInt::from_u32(UNAUTHENTICATED_STREAMS));
    t.receive_window(VarInt::from_u32(UNAUTHENTICATED_WINDOW));
}

/// Opens a tunnel connection's windows, once its certificate maps to an appliance.
pub fn open_for_appliance(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(VarInt::from_u32(TUNNEL_STREAMS));
    conn.set_receive_window(VarInt::from_u32(TUNNEL_WINDOW));
}
