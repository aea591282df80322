//! Revocation fan-out: every appliance of the fleet holds an operate grant; the grants are
//! revoked in a burst (`POST /v1/grants/ID/revoke`, what `postern access revoke` calls, from a
//! few kept-alive connections at once) and the clock stops when every agent has applied its
//! revocation.
//!
//! Then the kill switch ([`measure_bulk`]): every appliance is granted again, and ONE `POST
//! /v1/grants/revoke {"customer": …}` (what `postern access revoke --customer` calls) revokes
//! them all; the clock stops when every agent has applied it.
//!
//! "Applied" is observed at the agents, not assumed from the API's answer: an agent records each
//! grant set it applies in its customer trail (`grant.sync`, written after the set took effect
//! and before the command is acknowledged), and a watcher thread tails every agent's trail for
//! the first set without its grant.

use super::{percentile, post_each, round, Api, ApiTarget, CUSTOMER};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::{
    fs::File,
    io::Read,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};
use tokio::runtime::Runtime;

/// Bound on every agent applying what it was told (the grants, then their revocation).
const APPLY_LIMIT: Duration = Duration::from_secs(120);
/// Longest the watcher sleeps without a word from the kernel (then it reads every trail still
/// pending, in case a notice was lost).
const WATCH_PAUSE: Duration = Duration::from_millis(100);

pub struct Fanout {
    /// From the first revoke call to the last agent applying its revocation.
    pub total_ms: f64,
    /// From the first revoke call to the last one answered.
    pub api_ms: f64,
    /// Per grant, from its revoke call to its agent applying it; sorted.
    pub per_grant_ms: Vec<f64>,
}

impl Fanout {
    pub fn put(&self, put: &mut impl FnMut(&str, Value)) {
        put("revocation_fanout_ms", json!(round(self.total_ms, 1)));
        put("revocation_api_ms", json!(round(self.api_ms, 1)));
        put(
            "revocation_p50_ms",
            json!(round(percentile(&self.per_grant_ms, 50.0), 1)),
        );
        put(
            "revocation_p99_ms",
            json!(round(percentile(&self.per_grant_ms, 99.0), 1)),
        );
    }
}

/// Grants `app-{i}` an operate grant for each agent trail `trails[i]`, waits until every agent
/// holds it, then revokes them all from `concurrency` clients and times the fan-out.
pub fn measure(
    client: &Runtime,
    target: &ApiTarget,
    trails: &[PathBuf],
    concurrency: usize,
) -> Result<Fanout> {
    let n = trails.len();
    let (grants, watcher) = granted_then_watched(client, target, trails)?;
    eprintln!("scale_bench:   every agent holds its grant; revoking them");
    let t0 = Instant::now();
    let calls = revoke_all(client, target, &grants, concurrency)?;
    let api_ms = calls
        .iter()
        .map(|(_, _, end)| end.duration_since(t0))
        .max()
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0;
    let applied = watcher
        .join()
        .map_err(|_| anyhow!("the trail watcher panicked"))??;
    let missing = applied.iter().filter(|a| a.is_none()).count();
    if missing > 0 {
        bail!("{missing} of {n} agents never applied their revocation within {APPLY_LIMIT:?}");
    }
    let last = applied.iter().flatten().max().copied().unwrap_or(t0);
    let mut per_grant_ms: Vec<f64> = calls
        .iter()
        .filter_map(|(i, start, _)| {
            applied
                .get(*i)
                .copied()
                .flatten()
                .map(|at| at.saturating_duration_since(*start).as_secs_f64() * 1000.0)
        })
        .collect();
    per_grant_ms.sort_by(|a, b| a.total_cmp(b));
    Ok(Fanout {
        total_ms: last.duration_since(t0).as_secs_f64() * 1000.0,
        api_ms,
        per_grant_ms,
    })
}

/// The kill switch over the whole fleet.
pub struct Bulk {
    /// From the call's start to the last agent applying its revocation.
    pub total_ms: f64,
    /// From the call's start to its answer.
    pub api_ms: f64,
}

impl Bulk {
    pub fn put(&self, put: &mut impl FnMut(&str, Value)) {
        put("revocation_bulk_ms", json!(round(self.total_ms, 1)));
        put("revocation_bulk_api_ms", json!(round(self.api_ms, 1)));
    }
}

/// Grants every appliance again, waits until every agent holds its grant, then revokes them
/// all with one kill-switch call for the customer and times until every agent has applied it.
pub fn measure_bulk(client: &Runtime, target: &ApiTarget, trails: &[PathBuf]) -> Result<Bulk> {
    let n = trails.len();
    let (grants, watcher) = granted_then_watched(client, target, trails)?;
    let (t0, answered, answer) = client.block_on(async {
        let mut api = Api::new(target);
        // Connected before the clock starts, as a security team's session would be.
        api.get("/v1/whoami").await?;
        let t0 = Instant::now();
        let answer = api
            .post("/v1/grants/revoke", json!({ "customer": CUSTOMER }))
            .await
            .context("the kill switch call")?;
        anyhow::Ok((t0, Instant::now(), answer))
    })?;
    // Every live grant of the customer ends, the ops runs' grants (if any are left) too.
    let revoked: std::collections::HashSet<&str> = answer["grants"]
        .as_array()
        .map(|a| a.iter().filter_map(|g| g["id"].as_str()).collect())
        .unwrap_or_default();
    let left = grants
        .iter()
        .filter(|g| !revoked.contains(g.as_str()))
        .count();
    if left > 0 {
        bail!(
            "the kill switch left {left} of the {n} new grants live (it revoked {})",
            answer["revoked"]
        );
    }
    let applied = watcher
        .join()
        .map_err(|_| anyhow!("the trail watcher panicked"))??;
    let missing = applied.iter().filter(|a| a.is_none()).count();
    if missing > 0 {
        bail!("{missing} of {n} agents never applied the kill switch within {APPLY_LIMIT:?}");
    }
    let last = applied.iter().flatten().max().copied().unwrap_or(t0);
    Ok(Bulk {
        total_ms: last.saturating_duration_since(t0).as_secs_f64() * 1000.0,
        api_ms: answered.duration_since(t0).as_secs_f64() * 1000.0,
    })
}

/// One operate grant per appliance (active at once under the agents' automatic policy).
fn request_grants(client: &Runtime, target: &ApiTarget, n: usize) -> Result<Vec<String>> {
    post_each(
        client,
        target,
        n,
        |i| {
            let body = json!({
                "app": format!("app-{i}"), "customer": CUSTOMER, "level": "operate",
                "duration_s": 7200, "reason": "scale bench: revocation fan-out",
            });
            ("/v1/grants", body)
        },
        |i, g| {
            if g["state"] != "active" {
                bail!("the grant for app-{i} is not active: {g}");
            }
            g["id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("no id in {g}"))
        },
    )
}

/// Revokes every grant from `concurrency` kept-alive clients; returns (agent index, call
/// start, call end) per grant.
fn revoke_all(
    client: &Runtime,
    target: &ApiTarget,
    grants: &Arc<Vec<String>>,
    concurrency: usize,
) -> Result<Vec<(usize, Instant, Instant)>> {
    client.block_on(async {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..concurrency.clamp(1, grants.len().max(1)) {
            let (next, target, grants) = (next.clone(), target.clone(), grants.clone());
            tasks.push(tokio::spawn(async move {
                let mut api = Api::new(&target);
                // Connected before the clock starts, as an operator's session would be.
                api.get("/v1/whoami").await?;
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(id) = grants.get(i) else {
                        return anyhow::Ok(out);
                    };
                    let start = Instant::now();
                    let r = api
                        .post(&format!("/v1/grants/{id}/revoke"), json!({}))
                        .await
                        .with_context(|| format!("revoking the grant of app-{i}"))?;
                    if r["state"] != "revoked" {
                        bail!("revoking {id}: {r}");
                    }
                    out.push((i, start, Instant::now()));
                }
            }));
        }
        let mut all = Vec::with_capacity(grants.len());
        for t in tasks {
            all.extend(t.await??);
        }
        anyhow::Ok(all)
    })
}

fn grant_ids(sync: &Value) -> Vec<&str> {
    sync["detail"]["grants"]
        .as_array()
        .map(|g| g.iter().filter_map(|x| x["grant_id"].as_str()).collect())
        .unwrap_or_default()
}

/// When each agent applied a grant set without its grant (`TrailWatch::until`).
type Applied = thread::JoinHandle<Result<Vec<Option<Instant>>>>;

/// Grants every appliance `app-{i}` an operate grant, waits until every agent holds it, then
/// starts the watcher that sees each agent apply a set without it.
fn granted_then_watched(
    client: &Runtime,
    target: &ApiTarget,
    trails: &[PathBuf],
) -> Result<(Arc<Vec<String>>, Applied)> {
    let n = trails.len();
    let grants = request_grants(client, target, n)?;
    // Read from each trail's start: the sets recorded before hold none of these new grants, so
    // only sets recorded after them can end the first wait.
    let mut watch = TrailWatch::open(trails)?;
    let held = watch.until(APPLY_LIMIT, |i, sync| {
        grants
            .get(i)
            .is_some_and(|g| grant_ids(sync).contains(&g.as_str()))
    })?;
    if held.iter().any(Option::is_none) {
        bail!(
            "{} of {n} agents never applied their grant within {APPLY_LIMIT:?}",
            held.iter().filter(|h| h.is_none()).count()
        );
    }
    let grants = Arc::new(grants);
    let watcher = {
        let grants = grants.clone();
        thread::spawn(move || {
            watch.until(APPLY_LIMIT, |i, sync| {
                grants
                    .get(i)
                    .is_some_and(|g| !grant_ids(sync).contains(&g.as_str()))
            })
        })
    };
    Ok((grants, watcher))
}

/// Tails every agent's customer trail (JSON lines, appended by the agent) from where it was
/// last read, woken by inotify for the trails that were written to. Reading all 1000 trails
/// every few milliseconds instead took a third of one of the machine's two cores from the
/// gateway and agents it measures.
struct TrailWatch {
    files: Vec<(File, Vec<u8>)>,
    notices: Inotify,
}

impl TrailWatch {
    fn open(trails: &[PathBuf]) -> Result<TrailWatch> {
        let mut notices = Inotify::new()?;
        let files = trails
            .iter()
            .enumerate()
            .map(|(i, p)| {
                notices.watch(p, i)?;
                File::open(p)
                    .with_context(|| format!("opening {}", p.display()))
                    .map(|f| (f, Vec::new()))
            })
            .collect::<Result<_>>()?;
        Ok(TrailWatch { files, notices })
    }

    /// The complete lines appended to trail `i` since the last call.
    fn new_lines(&mut self, i: usize) -> Result<Vec<Value>> {
        let Some((file, partial)) = self.files.get_mut(i) else {
            return Ok(Vec::new());
        };
        let had = partial.len();
        file.read_to_end(partial)?;
        if partial.len() == had {
            return Ok(Vec::new());
        }
        let Some(end) = partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(Vec::new());
        };
        let complete: Vec<u8> = partial.drain(..=end).collect();
        Ok(complete
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect())
    }

    /// When each agent first recorded a grant set (`grant.sync`) for which `done(i, entry)`
    /// holds, reading only what was appended from now on; `None` for those that did not
    /// within `limit`.
    fn until(
        &mut self,
        limit: Duration,
        done: impl Fn(usize, &Value) -> bool,
    ) -> Result<Vec<Option<Instant>>> {
        let n = self.files.len();
        let mut at = vec![None; n];
        let mut pending: std::collections::BTreeSet<usize> = (0..n).collect();
        // First every trail (what was written before the call), then those the kernel names.
        let mut look: Vec<usize> = (0..n).collect();
        let t0 = Instant::now();
        while !pending.is_empty() && t0.elapsed() < limit {
            for i in look {
                if !pending.contains(&i) {
                    continue;
                }
                let lines = self.new_lines(i)?;
                if lines
                    .iter()
                    .any(|e| e["kind"] == "grant.sync" && done(i, e))
                {
                    if let Some(slot) = at.get_mut(i) {
                        *slot = Some(Instant::now());
                    }
                    pending.remove(&i);
                }
            }
            look = match self.notices.wait(WATCH_PAUSE)? {
                Some(written) => written,
                None => pending.iter().copied().collect(),
            };
        }
        Ok(at)
    }
}

/// An inotify instance watching the trails for writes (`IN_MODIFY`).
struct Inotify {
    fd: std::os::fd::OwnedFd,
    /// Watch descriptor to trail index.
    trails: std::collections::HashMap<i32, usize>,
    /// Where the kernel's notices are read into (reused).
    buf: Vec<u8>,
}

impl Inotify {
    fn new() -> Result<Inotify> {
        use std::os::fd::FromRawFd;
        // SAFETY: no pointers; the descriptor returned is owned here from now on.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("inotify_init1");
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Inotify {
            fd,
            trails: std::collections::HashMap::new(),
            buf: vec![0u8; 64 * 1024],
        })
    }

    fn watch(&mut self, path: &std::path::Path, trail: usize) -> Result<()> {
        use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let wd =
            unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
        if wd < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("watching {}", path.display()));
        }
        self.trails.insert(wd, trail);
        Ok(())
    }

    /// The trails written to, waiting up to `pause` for the first notice; `None` if none came
    /// or the kernel's queue overflowed (read them all then).
    fn wait(&mut self, pause: Duration) -> Result<Option<Vec<usize>>> {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(pause.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
        if ready <= 0 {
            return Ok(None);
        }
        let buf = &mut self.buf;
        // SAFETY: `buf` is writable for its length.
        let got = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        let got = usize::try_from(got).map_err(|_| std::io::Error::last_os_error())?;
        let header = std::mem::size_of::<libc::inotify_event>();
        let mut written = Vec::new();
        let mut at = 0;
        while let Some(raw) = buf.get(at..at + header).filter(|_| at + header <= got) {
            let word = |k: usize| {
                raw.get(k..k + 4)
                    .and_then(|b| b.try_into().ok())
                    .map(u32::from_ne_bytes)
                    .unwrap_or(0)
            };
            let (wd, mask, len) = (word(0) as i32, word(4), word(12) as usize);
            if mask & libc::IN_Q_OVERFLOW != 0 {
                return Ok(None);
            }
            if let Some(trail) = self.trails.get(&wd) {
                written.push(*trail);
            }
            at += header + len;
        }
        Ok(Some(written))
    }
}
