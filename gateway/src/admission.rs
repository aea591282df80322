//! Admission at the front doors: every listener (relay, API, kube, Postgres, SSH, tcp
//! endpoints) caps the handshakes it holds for clients that have not authenticated yet, in
//! total and per source address. Past a cap a new client is refused at once (its socket closed,
//! a QUIC attempt refused) rather than queued, so a flood of half-open handshakes costs the
//! gateway a bounded amount of memory and file descriptors and cannot crowd out clients that
//! authenticate. A [`Permit`] is held from accept until the client is authenticated (or gives
//! up, or the grace time runs out) and frees its slot when dropped.
//!
//! The counting is sans-IO ([`HandshakeCounts`]); [`Door`] wraps it for the listeners.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};
use tokio_util::sync::CancellationToken;

/// The caps of one listener (`[limits] unauthenticated_max`, `unauthenticated_max_per_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Handshakes held at once by the listener, from all sources.
    pub total: usize,
    /// Handshakes held at once for one source (an IPv4 address or an IPv6 /64).
    pub per_source: usize,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            total: 1024,
            per_source: 64,
        }
    }
}

/// Why a handshake was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its total of unauthenticated handshakes.
    Total,
    /// This source holds its share.
    PerSource,
}

/// The source a handshake is counted against: the IPv4 address, or the /64 of an IPv6
/// address (one host usually owns a whole /64, so counting single IPv6 addresses would not cap
/// anything). IPv4-mapped IPv6 addresses count as their IPv4 address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The handshakes a listener holds, by source. Pure state: no clock, no I/O.
#[derive(Debug, Default)]
pub struct HandshakeCounts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

impl HandshakeCounts {
    /// Counts one more handshake of `source` (already passed through [`source_of`]), or says
    /// which cap it would break; a refused handshake changes nothing.
    pub fn admit(&mut self, limits: AdmissionLimits, source: IpAddr) -> Result<(), Refusal> {
        if self.total >= limits.total {
            return Err(Refusal::Total);
        }
        let held = self.by_source.get(&source).copied().unwrap_or(0);
        if held >= limits.per_source {
            return Err(Refusal::PerSource);
        }
        self.by_source.insert(source, held + 1);
        self.total += 1;
        Ok(())
    }

    /// One handshake of `source` ended (authenticated, failed or timed out).
    pub fn release(&mut self, source: IpAddr) {
        if let Some(held) = self.by_source.get_mut(&source) {
            *held -= 1;
            self.total = self.total.saturating_sub(1);
            if *held == 0 {
                // Sources are not remembered once they hold nothing: the map is bounded by
                // the total cap, not by how many addresses ever knocked.
                self.by_source.remove(&source);
            }
        }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    pub fn of(&self, source: IpAddr) -> usize {
        self.by_source.get(&source).copied().unwrap_or(0)
    }

    pub fn sources(&self) -> usize {
        self.by_source.len()
    }
}

/// One listener's admission: its caps, what it holds, and how many it refused.
#[derive(Debug)]
pub struct Door {
    name: &'static str,
    limits: AdmissionLimits,
    counts: Mutex<HandshakeCounts>,
    refused: AtomicU64,
}

impl Door {
    pub fn new(name: &'static str, limits: AdmissionLimits) -> Arc<Door> {
        Arc::new(Door {
            name,
            limits,
            counts: Mutex::new(HandshakeCounts::default()),
            refused: AtomicU64::new(0),
        })
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, HandshakeCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new unauthenticated client from `peer`, or None (refuse it at once).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Permit> {
        let source = source_of(peer);
        match self.counts().admit(self.limits, source) {
            Ok(()) => Some(Permit {
                door: self.clone(),
                source,
            }),
            Err(why) => {
                let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
                // A flood refuses thousands a second: log the first and then every 1024th.
                if n == 1 || n.is_multiple_of(1024) {
                    tracing::warn!(door = self.name, %peer, ?why, refused = n, "refused an unauthenticated handshake: the listener is at its cap");
                }
                None
            }
        }
    }

    /// Handshakes held now (for tests and diagnostics).
    pub fn held(&self) -> usize {
        self.counts().total()
    }

    /// The listener this door admits to (`relay`, `api`, …).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Handshakes refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// A held handshake slot; dropping it (the client authenticated, failed, or ran out of time)
/// frees the slot.
#[derive(Debug)]
pub struct Permit {
    door: Arc<Door>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.door.counts().release(self.source);
    }
}

/// The doors of every listener, each with the same caps.
#[derive(Debug)]
pub struct FrontDoors {
    pub relay: Arc<Door>,
    pub api: Arc<Door>,
    pub kube: Arc<Door>,
    pub postgres: Arc<Door>,
    pub ssh: Arc<Door>,
    /// Shared by all tcp endpoint listeners.
    pub tcp: Arc<Door>,
}

impl FrontDoors {
    pub fn new(limits: AdmissionLimits) -> Arc<FrontDoors> {
        Arc::new(FrontDoors {
            relay: Door::new("relay", limits),
            api: Door::new("api", limits),
            kube: Door::new("kube", limits),
            postgres: Door::new("postgres", limits),
            ssh: Door::new("ssh", limits),
            tcp: Door::new("tcp", limits),
        })
    }
}

/// The next admitted client of a TCP listener with its permit, or None once `shutdown` is
/// cancelled. A client past the caps is closed at once, before any byte is read or written.
/// Accept errors (out of file descriptors, mostly) are logged and retried after a short pause.
pub async fn accept_admitted(
    door: &Arc<Door>,
    shutdown: &CancellationToken,
    listener: &tokio::net::TcpListener,
) -> Option<(tokio::net::TcpStream, SocketAddr, Permit)> {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((tcp, peer)) => match door.admit(peer.ip()) {
                Some(permit) => return Some((tcp, peer, permit)),
                None => drop(tcp),
            },
            Err(e) => {
                tracing::warn!(door = door.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Admits a QUIC connection attempt. An address that has not proven it receives what is sent
/// to it gets a stateless Retry (always, not only under load: a Retry is smaller than the
/// Initial that asked for it, so the relay never amplifies what an unvalidated address sent);
/// a validated one past the caps is refused at once. Returns the attempt to accept, with its
/// permit.
pub fn admit_quic(
    door: &Arc<Door>,
    incoming: quinn::Incoming,
) -> Option<(quinn::Incoming, Permit)> {
    if !incoming.remote_address_validated() {
        if incoming.may_retry() {
            if let Err(e) = incoming.retry() {
                e.into_incoming().ignore();
            }
        } else {
            incoming.ignore();
        }
        return None;
    }
    match door.admit(incoming.remote_address().ip()) {
        Some(permit) => Some((incoming, permit)),
        None => {
            incoming.refuse();
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const CAPS: AdmissionLimits = AdmissionLimits {
        total: 3,
        per_source: 2,
    };

    #[test]
    fn a_source_past_its_share_is_refused_while_others_are_admitted() {
        let mut c = HandshakeCounts::default();
        assert_eq!(c.admit(CAPS, ip("10.0.0.1")), Ok(()));
        assert_eq!(c.admit(CAPS, ip("10.0.0.1")), Ok(()));
        assert_eq!(c.admit(CAPS, ip("10.0.0.1")), Err(Refusal::PerSource));
        assert_eq!(c.of(ip("10.0.0.1")), 2, "a refusal holds nothing");
        assert_eq!(c.admit(CAPS, ip("10.0.0.2")), Ok(()));
        assert_eq!(c.admit(CAPS, ip("10.0.0.3")), Err(Refusal::Total));
        assert_eq!(c.total(), 3);
        c.release(ip("10.0.0.1"));
        assert_eq!(c.admit(CAPS, ip("10.0.0.3")), Ok(()));
    }

    #[test]
    fn released_sources_are_forgotten_and_unknown_releases_change_nothing() {
        let mut c = HandshakeCounts::default();
        c.admit(CAPS, ip("10.0.0.1")).unwrap();
        c.release(ip("10.0.0.1"));
        c.release(ip("10.0.0.1"));
        c.release(ip("10.9.9.9"));
        assert_eq!((c.total(), c.sources()), (0, 0));
    }

    #[test]
    fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(source_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:aaaa::1")),
            source_of(ip("2001:db8:1:2:bbbb::7"))
        );
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    #[test]
    fn a_permit_frees_its_slot_when_dropped() {
        let door = Door::new("test", CAPS);
        let a = door.admit(ip("10.0.0.1")).unwrap();
        let _b = door.admit(ip("10.0.0.1")).unwrap();
        assert!(door.admit(ip("10.0.0.1")).is_none());
        assert_eq!((door.held(), door.refused()), (2, 1));
        drop(a);
        assert_eq!(door.held(), 1);
        assert!(door.admit(ip("10.0.0.1")).is_some());
    }

    #[tokio::test]
    async fn a_listener_closes_clients_past_the_cap_at_once_and_hands_out_the_rest() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let door = Door::new(
            "test",
            AdmissionLimits {
                total: 10,
                per_source: 1,
            },
        );
        let shutdown = CancellationToken::new();
        let first = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (_held, _, _permit) = accept_admitted(&door, &shutdown, &listener).await.unwrap();
        // The second client from the same address is closed without a byte.
        let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepting = tokio::spawn({
            let (door, shutdown) = (door.clone(), shutdown.clone());
            async move {
                let r = accept_admitted(&door, &shutdown, &listener).await;
                r.map(|(_, peer, _)| peer)
            }
        });
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), second.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );
        assert_eq!(door.refused(), 1);
        shutdown.cancel();
        assert_eq!(accepting.await.unwrap(), None);
        drop(first);
    }
}
