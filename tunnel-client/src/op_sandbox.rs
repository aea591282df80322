//! Where an op's process runs and how all of it ends.
//!
//! **Who it runs as.** With `[ops] user = "…"` in agent.toml the agent (root) starts every op
//! tool as that unprivileged user: its supplementary groups dropped, its gid and uid set, and
//! `no_new_privs` so no set-uid program (sudo, su) gives privileges back. Its environment is
//! cleared; its working directory and `HOME` are a fresh 0700 directory owned by that user and
//! removed after the op. The agent's own secrets (its private key, agent.toml, every
//! `admin_password_file`, VM keys, the customer's trail) must be root-owned and 0600 (the
//! trail is created so): the op user then can neither read them nor write the trail. Without
//! `[ops] user` an op runs with the agent's own privileges; the agent says so loudly at start.
//!
//! **How it ends.** Every op gets a cgroup v2 of its own when the agent can make one (a
//! writable cgroup2 hierarchy, as for root on a systemd or container host): the child joins it
//! before it execs the tool (in the agent's launcher, [`crate::op_launcher`], or between fork and
//! exec without one), so nothing it starts can leave it, whatever it does (`setsid`, double
//! fork, `nohup`, ignoring SIGTERM). Ending the op writes `cgroup.kill` (SIGKILL to every
//! member; on kernels before 5.14 the cgroup is frozen and each member killed) and waits
//! until the cgroup is empty. Without cgroup v2 the agent is a child subreaper
//! (`PR_SET_CHILD_SUBREAPER`): a process that escapes its parent is re-parented to the agent
//! rather than to init, and ending an op kills, until none is left, every process descended
//! from the op's root plus every such orphan (a child of the agent that is not a running op's
//! root), then reaps them. In that mode an op ending also ends orphans that other ops left
//! behind: the agent starts no other programs, so any such orphan escaped some op.

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::fs::DirBuilderExt,
    },
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard, OnceLock},
    time::{Duration, Instant},
};

/// How long ending an op may take before the agent gives up waiting (it logs what survived).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The unprivileged user ops run as (`[ops] user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("[ops] user = {0:?} is not a user on this machine (create it, e.g. `useradd --system --no-create-home {0}`)")]
    NoSuchUser(String),
    #[error("[ops] user = {0:?} is root (uid 0); ops must run as an unprivileged user")]
    Root(String),
    #[error("cannot look up [ops] user {name:?}: {source}")]
    Lookup { name: String, source: io::Error },
}

impl OpsUser {
    /// Looks the user up in the system's user database (NSS).
    pub fn lookup(name: &str) -> Result<OpsUser, SandboxError> {
        let c = CString::new(name).map_err(|_| SandboxError::NoSuchUser(name.to_string()))?;
        let mut buf = vec![0u8; 16 * 1024];
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwnam_r writes into it and `buf`.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call, `buf.len()` is the buffer's size.
        let rc = unsafe {
            libc::getpwnam_r(
                c.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc != 0 {
            return Err(SandboxError::Lookup {
                name: name.to_string(),
                source: io::Error::from_raw_os_error(rc),
            });
        }
        if result.is_null() {
            return Err(SandboxError::NoSuchUser(name.to_string()));
        }
        if pwd.pw_uid == 0 {
            return Err(SandboxError::Root(name.to_string()));
        }
        Ok(OpsUser {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }
}

/// How the ops of this agent are confined; decided once at start.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// `None`: ops run as the agent's own user.
    pub user: Option<OpsUser>,
    /// The cgroup v2 directory under which each op gets its own; `None`: subreaper fallback.
    pub cgroup_parent: Option<PathBuf>,
    /// An executable that runs [`crate::op_launcher`] when given its hidden first argument
    /// (`postern-agent`): ops start through it without forking the agent. `None`: the agent
    /// forks and takes the steps in the child itself.
    pub launcher: Option<PathBuf>,
}

impl Confinement {
    /// `[ops] user` (looked up) and, when the agent may make cgroups, a parent for per-op
    /// cgroups under the agent's own. Without cgroups the agent becomes a child subreaper.
    pub fn detect(user: Option<&str>) -> Result<Confinement, SandboxError> {
        let user = user.map(OpsUser::lookup).transpose()?;
        let cgroup_parent = cgroup_parent();
        if cgroup_parent.is_none() {
            become_subreaper();
        }
        Ok(Confinement {
            user,
            cgroup_parent,
            launcher: None,
        })
    }

    /// Starts ops through `launcher` (see [`Confinement::launcher`]).
    pub fn with_launcher(self, launcher: Option<PathBuf>) -> Confinement {
        Confinement { launcher, ..self }
    }

    /// The subreaper fallback only (what an appliance without a writable cgroup2 gets).
    pub fn without_cgroups(user: Option<OpsUser>) -> Confinement {
        become_subreaper();
        Confinement {
            user,
            cgroup_parent: None,
            launcher: None,
        }
    }

    /// What the agent's log says at start.
    pub fn describe(&self) -> String {
        let who = match &self.user {
            Some(u) => format!("as user {} (uid {})", u.name, u.uid),
            None => "with the agent's own privileges".to_string(),
        };
        let how = match &self.cgroup_parent {
            Some(p) => format!("each in its own cgroup under {}", p.display()),
            None => "tracked as a child subreaper (no writable cgroup v2)".to_string(),
        };
        format!("ops run {who}, {how}")
    }
}

/// Logs how ops will run; loudly when they would run as root.
pub fn announce(c: &Confinement) {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if c.user.is_none() && root {
        tracing::warn!(
            "agent.toml has no [ops] user: one-off ops run as root and can read the agent's key, agent.toml and every credential; set [ops] user = \"postern-ops\" (an unprivileged user)"
        );
    }
    tracing::info!("{}", c.describe());
}

/// The agent's cgroup v2 directory plus `postern-ops`, if it can be made and written.
///
/// A process-wide static on purpose (the house rule's one kind of exception): which cgroup a
/// process is in, and whether it may make children there, is a fact about the process, the
/// same for every agent it runs; each agent's [`Confinement`] holds the answer as a field.
/// Probing forks the whole process, so once per process, not once per agent run
/// (`scale_bench` runs a thousand agents in one process; a probe each stalled its start-up).
fn cgroup_parent() -> Option<PathBuf> {
    static PARENT: OnceLock<Option<PathBuf>> = OnceLock::new();
    PARENT.get_or_init(probe_cgroup_parent).clone()
}

fn probe_cgroup_parent() -> Option<PathBuf> {
    let mount = cgroup2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_start_matches('/')
        .to_string();
    let parent = mount.join(rel).join("postern-ops");
    match std::fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(_) => return None,
    }
    // Probe: a child cgroup we can make, join from a forked child, kill and remove.
    let probe = OpCgroup::create(&parent, "probe").ok()?;
    let ok = probe.probe_join();
    drop(probe);
    ok.then_some(parent)
}

/// Where the cgroup2 hierarchy is mounted (`/sys/fs/cgroup`, or `…/unified` on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split(' ').next()? == "cgroup2")
            .then(|| left.split(' ').nth(4).map(PathBuf::from))?
    })
}

fn become_subreaper() {
    // SAFETY: prctl with integer arguments; failure leaves the agent as it was (logged).
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot become a child subreaper; escaped op processes may outlive their op");
    }
}

/// One op's cgroup: joined by the child before exec, killed and removed at the op's end.
#[derive(Debug)]
pub struct OpCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, opened by the agent so the child (already the op user) can join.
    procs: OwnedFd,
}

impl OpCgroup {
    pub fn create(parent: &Path, op_id: &str) -> io::Result<OpCgroup> {
        let dir = parent.join(format!(
            "op-{}-{:08x}",
            safe_name(op_id),
            rand::random::<u32>()
        ));
        std::fs::create_dir(&dir)?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .map(OwnedFd::from);
        match procs {
            Ok(procs) => Ok(OpCgroup { dir, procs }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    pub fn procs_fd(&self) -> i32 {
        self.procs.as_raw_fd()
    }

    /// What a launcher opens to join (it is still privileged then).
    pub fn procs_path(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn members(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGKILLs every member and waits (bounded) until the cgroup is empty.
    pub fn kill_all(&self) {
        let deadline = Instant::now() + KILL_WAIT;
        let has_kill = std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok();
        if !has_kill {
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "1");
        }
        loop {
            let members = self.members();
            if members.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                tracing::error!(cgroup = %self.dir.display(), ?members, "op processes survived SIGKILL");
                return;
            }
            if !has_kill {
                for pid in &members {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Forks a child that joins the cgroup, then kills it through the cgroup.
    fn probe_join(&self) -> bool {
        let fd = self.procs_fd();
        let mut cmd = std::process::Command::new("/bin/sleep");
        cmd.arg("30");
        // SAFETY: only async-signal-safe syscalls run between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || join_cgroup(fd));
        }
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        let joined = self.members().contains(&(child.id() as i32));
        self.kill_all();
        let _ = child.kill();
        let _ = child.wait();
        joined
    }
}

impl Drop for OpCgroup {
    fn drop(&mut self) {
        self.kill_all();
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "cannot remove the op's cgroup");
        }
    }
}

/// In the forked child: move this process into the cgroup whose `cgroup.procs` is `fd`.
fn join_cgroup(fd: i32) -> io::Result<()> {
    // SAFETY: write(2) on an fd the parent opened; "0" means "the writing process".
    let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
    if n != 1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What runs in the forked child before exec: join the cgroup (while still root), then drop
/// to the op user for good. Only async-signal-safe syscalls.
pub fn child_setup(cgroup_fd: Option<i32>, user: Option<(u32, u32)>) -> io::Result<()> {
    if let Some(fd) = cgroup_fd {
        join_cgroup(fd)?;
    }
    if let Some((uid, gid)) = user {
        let groups = [gid as libc::gid_t];
        // SAFETY: plain syscalls with valid arguments; any failure aborts the spawn.
        unsafe {
            if libc::setgroups(1, groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // A set-uid root program must not be a way back.
            if libc::setuid(0) == 0 {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
        }
    }
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn safe_name(op_id: &str) -> String {
    op_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        .take(64)
        .collect()
}

/// The roots of running ops (the agent's own children, reaped by tokio): the subreaper sweep
/// kills and reaps every *other* child of the agent, and must never reap these.
///
/// A process-wide static on purpose (the house rule's one kind of exception): the children
/// of a process, and the orphans re-parented to it as a subreaper, belong to the process, not
/// to one agent. With several agents in a process (`scale_bench`), a registry per agent would
/// let one agent's sweep take another agent's running op for an orphan and kill it.
fn roots() -> MutexGuard<'static, HashSet<i32>> {
    static ROOTS: OnceLock<Mutex<HashSet<i32>>> = OnceLock::new();
    ROOTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Runs `spawn` with the root registry locked, registering the pid it returns.
pub fn spawn_root<T>(
    spawn: impl FnOnce() -> io::Result<(T, Option<u32>)>,
) -> io::Result<(T, Option<u32>)> {
    let mut roots = roots();
    let r = spawn()?;
    if let Some(pid) = r.1 {
        roots.insert(pid as i32);
    }
    Ok(r)
}

/// The op's root was reaped.
pub fn forget_root(pid: i32) {
    roots().remove(&pid);
}

/// One process as `/proc/PID/stat` says: (parent, state).
fn stat(pid: i32) -> Option<(i32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = s.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((ppid, state))
}

fn all_processes() -> HashMap<i32, (i32, char)> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        {
            if let Some(s) = stat(pid) {
                out.insert(pid, s);
            }
        }
    }
    out
}

/// The subreaper fallback: SIGKILLs, round after round until none is left (bounded), every
/// process descended from `root` and every orphan re-parented to the agent; reaps the orphans.
/// `root` itself is killed but left to its owner (tokio) to reap.
pub fn kill_tree(root: i32) {
    let me = std::process::id() as i32;
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        let procs = all_processes();
        let running_roots = roots().clone();
        let mut doomed: HashSet<i32> = HashSet::new();
        // The root only while it is still ours (running or a zombie): once reaped, its pid may
        // be another process's, and its children are orphans re-parented to the agent.
        let mut frontier: Vec<i32> = procs
            .get(&root)
            .filter(|(ppid, _)| *ppid == me)
            .map(|_| root)
            .into_iter()
            .collect();
        // Orphans: children of the agent that are no op's root (the agent starts nothing else).
        frontier.extend(
            procs
                .iter()
                .filter(|(pid, (ppid, _))| *ppid == me && !running_roots.contains(pid))
                .map(|(pid, _)| *pid),
        );
        while let Some(p) = frontier.pop() {
            if doomed.insert(p) {
                frontier.extend(
                    procs
                        .iter()
                        .filter(|(_, (ppid, _))| *ppid == p)
                        .map(|(pid, _)| *pid),
                );
            }
        }
        let mut alive = 0;
        for pid in &doomed {
            let Some((ppid, state)) = procs.get(pid) else {
                continue;
            };
            if !matches!(state, 'Z' | 'X') {
                alive += 1;
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            } else if *ppid == me && *pid != root && !running_roots.contains(pid) {
                // SAFETY: a zombie child of ours that no one else waits for.
                unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
        }
        if alive == 0 {
            return;
        }
        if Instant::now() > deadline {
            tracing::error!(root, alive, "op processes survived SIGKILL");
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The op's working directory and `HOME`: fresh, 0700, owned by the op user, removed after.
#[derive(Debug)]
pub struct OpDir(PathBuf);

impl OpDir {
    pub fn create(op_id: &str, user: Option<&OpsUser>) -> io::Result<OpDir> {
        let base = std::env::temp_dir();
        let mut last = None;
        for _ in 0..8 {
            let path = base.join(format!(
                "postern-op-{}-{:016x}",
                safe_name(op_id),
                rand::random::<u64>()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = OpDir(path);
                    if let Some(u) = user {
                        std::os::unix::fs::chown(&dir.0, Some(u.uid), Some(u.gid))?;
                    }
                    return Ok(dir);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free name")))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Hands what the agent wrote into the directory (a passfile, credentials) to the op user.
    pub fn give_to(&self, user: Option<&OpsUser>) -> io::Result<()> {
        let Some(u) = user else { return Ok(()) };
        chown_tree(&self.0, u.uid, u.gid)
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

impl Drop for OpDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the op's working directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_unknown_users_are_refused() {
        assert!(matches!(
            OpsUser::lookup("root"),
            Err(SandboxError::Root(_))
        ));
        assert!(matches!(
            OpsUser::lookup("postern-no-such-user-xyz"),
            Err(SandboxError::NoSuchUser(_))
        ));
        assert!(matches!(
            OpsUser::lookup("a\0b"),
            Err(SandboxError::NoSuchUser(_))
        ));
        let nobody = OpsUser::lookup("nobody").unwrap();
        assert_ne!(nobody.uid, 0);
    }

    #[test]
    fn names_are_safe() {
        assert_eq!(safe_name("op_1/../x y"), "op_1xy");
    }
}
