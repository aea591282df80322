//! How the agent's process asks glibc's allocator to hand out large buffers.
//!
//! Each QUIC endpoint (one per connection attempt) allocates a zeroed receive buffer of about
//! 2.9 MiB (`max_udp_payload_size × 64 GRO segments × 32 datagrams`), of which a tunnel
//! touches only the first pages. glibc serves such a request with a fresh `mmap`, whose
//! untouched pages cost nothing, until the first time one is freed (an endpoint dropped after
//! enrollment or at a reconnect): its dynamic threshold then rises past that size, and every
//! later buffer comes from the heap and is zeroed page by page, all of it resident. Measured
//! with 300 agents in one process (`scale_bench`): 1545 KiB per agent with the dynamic
//! threshold, 276 KiB with it fixed.

/// Fixes glibc's mmap threshold at its default (128 KiB), which also turns off its dynamic
/// adjustment. Call once, first thing in `main`, before other threads start.
pub fn fix_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt with an integer parameter; before other threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
