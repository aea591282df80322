//! When an SSH endpoint ends, the agent undoes what its engineers left on the VM: it logs in
//! with its own SSH client as the resource's user and runs the resource's `teardown_command`
//! (default: [`DEFAULT_SCRIPT`], which ends every process of the user but its own session,
//! removes the user's crontab and `at` jobs and stops its running `systemctl --user` units).
//! What it ended is recorded as `ssh.teardown` in the customer's trail and sent to the gateway
//! for the vendor's ([`ToGateway::SshTeardown`]).
//!
//! Endpoints of one resource share its login user, so the teardown waits for the last of them:
//! while another SSH endpoint on the resource is live, the report says `skipped` and that
//! endpoint's own end sweeps everything. Endpoints that ended while the agent was disconnected
//! are torn down after the next endpoint sync ([`Teardowns::synced`]).

use crate::{audit::Entry, config::ResourceConfig, grants::Liveness, sessions::Sessions};
use endpoint_types::{
    frame::{EndpointGrant, ToGateway},
    resource::{CloseReason, EndpointType},
    ssh_scope::{KilledProcess, SshTeardown},
};
use jiff::Timestamp;
use russh::ChannelMsg;
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::mpsc;

/// The whole teardown (login, script, output) is bounded by this.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);
/// Output kept from the teardown command.
const OUTPUT_CAP: usize = 512 * 1024;
/// Reports kept for the gateway while the agent is disconnected.
const PENDING_REPORTS: usize = 256;
/// The last line of a teardown that ran to its end.
pub const DONE_MARKER: &str = "postern-teardown-done";

/// The default teardown, fed to `sh -s` as the resource's user. Every line it prints is one
/// thing it ended (`killed PID CMDLINE`, `crontab LINE`, `at JOB`, `unit NAME`), then
/// [`DONE_MARKER`]. Processes are frozen (SIGSTOP) round after round until no new one appears,
/// so nothing can fork away from the sweep, and then killed. Its own session (this shell, its
/// ancestors up to sshd, and its children) is spared.
pub const DEFAULT_SCRIPT: &str = r#"PATH=/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin
export PATH
uid=$(id -u)
self=$$
if command -v crontab >/dev/null 2>&1; then
  if tab=$(crontab -l 2>/dev/null); then
    printf '%s\n' "$tab" | while IFS= read -r l; do
      case $l in ''|'#'*) ;; *) printf 'crontab %s\n' "$l" ;; esac
    done
    crontab -r 2>/dev/null
  fi
fi
if command -v atq >/dev/null 2>&1; then
  atq 2>/dev/null | while read -r j rest; do atrm "$j" 2>/dev/null && printf 'at %s %s\n' "$j" "$rest"; done
fi
if command -v systemctl >/dev/null 2>&1 && systemctl --user show-environment >/dev/null 2>&1; then
  systemctl --user list-units --no-legend --plain --state=active --type=service,scope,timer,path,socket 2>/dev/null |
    while read -r u rest; do
      case $u in init.scope) continue ;; esac
      systemctl --user stop "$u" 2>/dev/null && printf 'unit %s\n' "$u"
    done
fi
ppid_of() {
  st=
  read -r st 2>/dev/null </proc/$1/stat || return 1
  set -- ${st##*) }
  ppid=$2 state=$1
}
keep=" $self "
p=$self n=0
while [ "$p" -gt 1 ] && [ $n -lt 64 ] && ppid_of "$p"; do
  p=$ppid keep="$keep$p " n=$((n + 1))
done
mine() {
  q=$1 n=0
  while [ "$q" -gt 1 ] && [ $n -lt 64 ]; do
    [ "$q" = "$self" ] && return 0
    ppid_of "$q" || return 1
    q=$ppid n=$((n + 1))
  done
  return 1
}
owned() {
  while read -r k real eff rest; do
    if [ "$k" = "Uid:" ]; then [ "$real" = "$uid" ] || [ "$eff" = "$uid" ]; return; fi
  done 2>/dev/null </proc/$1/status
  return 1
}
victims=" "
round=0
while [ $round -lt 50 ]; do
  new=
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    case "$keep$victims" in *" $pid "*) continue ;; esac
    owned "$pid" || continue
    ppid_of "$pid" || continue
    [ "$state" = Z ] && continue
    mine "$pid" && continue
    kill -STOP "$pid" 2>/dev/null && new="$new$pid "
  done
  [ -z "$new" ] && break
  victims="$victims$new"
  round=$((round + 1))
done
report=
for pid in $victims; do
  cmd=
  [ -r /proc/$pid/cmdline ] && cmd=$(tr '\0\n' '  ' </proc/$pid/cmdline 2>/dev/null)
  report="$report$pid $cmd
"
done
dead=" "
for pid in $victims; do kill -KILL "$pid" 2>/dev/null && dead="$dead$pid "; done
printf '%s' "$report" | while read -r pid cmd; do
  case "$dead" in *" $pid "*) printf 'killed %s %s\n' "$pid" "$cmd" ;; esac
done
echo postern-teardown-done
"#;

/// The SSH endpoints this agent owes a teardown, and the way to the gateway for reports.
#[derive(Debug, Default)]
pub struct Teardowns {
    state: Mutex<State>,
    /// One teardown at a time per resource (its user).
    running: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Debug, Default)]
struct State {
    owed: HashMap<String, EndpointGrant>,
    outbox: Option<mpsc::Sender<ToGateway>>,
    pending: VecDeque<ToGateway>,
}

impl State {
    /// Hands waiting reports to the connection, in order, as far as it takes them.
    fn flush(&mut self) {
        let Some(outbox) = &self.outbox else { return };
        while let Some(f) = self.pending.pop_front() {
            if let Err(e) = outbox.try_send(f) {
                self.pending.push_front(e.into_inner());
                break;
            }
        }
    }
}

impl Teardowns {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An SSH endpoint became live here: its end will be torn down.
    pub fn owe(&self, grant: &EndpointGrant) {
        if grant.endpoint_type == EndpointType::Ssh {
            self.state()
                .owed
                .insert(grant.endpoint_id.clone(), grant.clone());
        }
    }

    /// A new connection to the gateway: reports go out through `outbox`, the waiting ones first.
    pub fn connected(&self, outbox: &mpsc::Sender<ToGateway>) {
        let mut st = self.state();
        st.outbox = Some(outbox.clone());
        st.flush();
    }

    fn report(&self, frame: ToGateway) {
        let mut st = self.state();
        if st.pending.len() >= PENDING_REPORTS {
            st.pending.pop_front();
            tracing::warn!("dropping the oldest teardown report waiting for the gateway");
        }
        st.pending.push_back(frame);
        st.flush();
    }

    fn lock_for(&self, resource_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(resource_id.to_string())
            .or_default()
            .clone()
    }
}

/// An SSH endpoint ended: its teardown runs on a task of its own, whose report the
/// endpoint's teardown proof takes. `None` if none is owed (already started, or not ssh).
pub fn start(
    ctx: &Sessions,
    grant: &EndpointGrant,
    reason: CloseReason,
) -> Option<tokio::task::JoinHandle<SshTeardown>> {
    let teardowns = ctx.teardowns.clone();
    teardowns.state().owed.remove(&grant.endpoint_id)?;
    // The teardown runs as the VM user the endpoint's phase used.
    let resource = ctx
        .config
        .resource(&grant.resource_id)
        .and_then(|r| crate::phases::for_phase(r, grant.phase).ok())?;
    let others = other_live_endpoints(ctx, grant);
    let ctx = ctx.clone();
    let grant = grant.clone();
    Some(tokio::spawn(async move {
        let report = if others.is_empty() {
            let lock = teardowns.lock_for(&resource.id);
            let _one_at_a_time = lock.lock().await;
            match tokio::time::timeout(TEARDOWN_TIMEOUT, run(&ctx, &grant, &resource)).await {
                Ok(r) => r,
                Err(_) => Outcome {
                    error: Some(format!(
                        "the teardown did not finish within {TEARDOWN_TIMEOUT:?}"
                    )),
                    ..Default::default()
                },
            }
        } else {
            Outcome {
                skipped: Some(format!("the login user is still in use by live endpoint(s) {}; the last one's end tears down", others.join(", "))),
                ..Default::default()
            }
        };
        let report = report.into_report(&grant, &resource, reason);
        let detail = serde_json::to_value(&report).unwrap_or_default();
        tracing::info!(endpoint = %grant.endpoint_id, killed = report.killed.len(), error = ?report.error, "ssh teardown");
        ctx.audit.record_or_log(
            Entry::new("ssh.teardown", ctx.audit.agent_actor(), detail)
                .endpoint(grant.endpoint_id.clone()),
        );
        teardowns.report(ToGateway::SshTeardown(report.clone()));
        report
    }))
}

/// Other SSH endpoints on the same resource that are live by this agent's table.
fn other_live_endpoints(ctx: &Sessions, grant: &EndpointGrant) -> Vec<String> {
    let candidates: Vec<String> = ctx
        .teardowns
        .state()
        .owed
        .values()
        .filter(|g| {
            g.resource_id == grant.resource_id
                && g.endpoint_id != grant.endpoint_id
                && g.phase == grant.phase
        })
        .map(|g| g.endpoint_id.clone())
        .collect();
    let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
    let now = Timestamp::now();
    candidates
        .into_iter()
        .filter(|id| matches!(live.check(id, now), Liveness::Live { .. }))
        .collect()
}

/// What one teardown did, before it becomes a report.
#[derive(Debug, Default, PartialEq)]
struct Outcome {
    parsed: Parsed,
    exit_status: Option<u32>,
    skipped: Option<String>,
    error: Option<String>,
}

impl Outcome {
    fn into_report(
        self,
        grant: &EndpointGrant,
        resource: &ResourceConfig,
        reason: CloseReason,
    ) -> SshTeardown {
        let Parsed {
            killed,
            crontab,
            at_jobs,
            units,
            other_output,
            done,
        } = self.parsed;
        let error = self.error.or_else(|| {
            (self.skipped.is_none() && resource.teardown_command.is_none() && !done).then(|| {
                "the teardown script did not run to its end; leftovers may remain".to_string()
            })
        });
        SshTeardown {
            endpoint_id: grant.endpoint_id.clone(),
            resource_id: resource.id.clone(),
            user: resource.user.clone().unwrap_or_default(),
            reason,
            killed,
            crontab,
            at_jobs,
            units,
            other_output,
            exit_status: self.exit_status,
            skipped: self.skipped,
            error,
            truncated: false,
        }
        .capped()
    }
}

/// Logs in as the resource's user and runs the teardown command to its end.
async fn run(ctx: &Sessions, grant: &EndpointGrant, resource: &ResourceConfig) -> Outcome {
    let failed = |e: String| Outcome {
        error: Some(e),
        ..Default::default()
    };
    let handle = match crate::ssh::login_for(ctx, &grant.endpoint_id, None, resource).await {
        Ok(h) => h,
        Err(e) => return failed(format!("cannot log in to the VM: {}", e.message)),
    };
    let mut channel = match handle.channel_open_session().await {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot open a session on the VM: {e}")),
    };
    let (command, script) = match &resource.teardown_command {
        Some(c) => (c.as_str(), None),
        None => ("sh -s", Some(DEFAULT_SCRIPT)),
    };
    if let Err(e) = channel.exec(true, command.as_bytes()).await {
        return failed(format!("cannot start the teardown: {e}"));
    }
    if let Some(script) = script {
        if let Err(e) = channel.data(script.as_bytes()).await {
            return failed(format!("cannot send the teardown script: {e}"));
        }
    }
    let _ = channel.eof().await;
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut exit_status = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            ChannelMsg::Data { data } if out.len() < OUTPUT_CAP => out.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, .. } if err.len() < OUTPUT_CAP => {
                err.extend_from_slice(&data)
            }
            ChannelMsg::ExitStatus { exit_status: s } => exit_status = Some(s),
            ChannelMsg::Failure => {
                return failed("the VM refused to run the teardown command".into())
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "teardown done", "en")
        .await;
    let mut parsed = parse_output(&String::from_utf8_lossy(&out));
    let stderr = String::from_utf8_lossy(&err);
    parsed.other_output.extend(
        stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("stderr: {l}")),
    );
    let error = match exit_status {
        Some(0) => None,
        Some(c) => Some(format!("the teardown command exited with status {c}")),
        None => Some("the teardown command ended without an exit status".into()),
    };
    Outcome {
        parsed,
        exit_status,
        skipped: None,
        error,
    }
}

/// A teardown's report lines, sorted by what they say.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    killed: Vec<KilledProcess>,
    crontab: Vec<String>,
    at_jobs: Vec<String>,
    units: Vec<String>,
    other_output: Vec<String>,
    done: bool,
}

/// Reads the report lines of [`DEFAULT_SCRIPT`] (a custom command may print them too).
fn parse_output(out: &str) -> Parsed {
    let mut p = Parsed::default();
    for line in out.lines() {
        let line = line.trim_end();
        if line == DONE_MARKER {
            p.done = true;
            continue;
        }
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "killed" => {
                let (pid, cmd) = rest.split_once(' ').unwrap_or((rest, ""));
                match pid.parse() {
                    Ok(pid) => p.killed.push(KilledProcess {
                        pid,
                        command: cmd.trim().to_string(),
                    }),
                    Err(_) => p.other_output.push(line.to_string()),
                }
            }
            "crontab" => p.crontab.push(rest.to_string()),
            "at" => p.at_jobs.push(rest.to_string()),
            "unit" => p.units.push(rest.to_string()),
            "" => {}
            _ => p.other_output.push(line.to_string()),
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_are_sorted_out() {
        let out = "crontab */5 * * * * /home/x/beacon.sh\nkilled 123 sleep 600 \nkilled 77 tmux new -d\nat 4 Mon Dec  7 10:00:00 2026 a x\nunit run-r1.service\nkilled x y\nhello\n\npostern-teardown-done\n";
        let p = parse_output(out);
        assert_eq!(
            p.killed,
            vec![
                KilledProcess {
                    pid: 123,
                    command: "sleep 600".into()
                },
                KilledProcess {
                    pid: 77,
                    command: "tmux new -d".into()
                }
            ]
        );
        assert_eq!(p.crontab, vec!["*/5 * * * * /home/x/beacon.sh"]);
        assert_eq!(p.at_jobs, vec!["4 Mon Dec  7 10:00:00 2026 a x"]);
        assert_eq!(p.units, vec!["run-r1.service"]);
        assert_eq!(p.other_output, vec!["killed x y", "hello"]);
        assert!(p.done);
        assert!(!parse_output("killed 1 a\n").done);
    }

    fn grant() -> EndpointGrant {
        EndpointGrant {
            phase: endpoint_types::phase::operate(),
            endpoint_id: "ep_1".into(),
            endpoint_type: EndpointType::Ssh,
            resource_id: "aws_instance.worker".into(),
            expires_at: Timestamp::now(),
            grant_id: None,
            signed_decision: None,
        }
    }

    fn resource(teardown_command: Option<&str>) -> ResourceConfig {
        let cmd = teardown_command
            .map(|c| format!("teardown_command = {c:?}\n"))
            .unwrap_or_default();
        toml::from_str(&format!(
            "id = \"aws_instance.worker\"\nkind = \"ssh\"\nhost = \"127.0.0.1:22\"\nuser = \"deploy\"\nkey = \"/k\"\n{cmd}"
        ))
        .unwrap()
    }

    #[test]
    fn a_default_script_cut_short_is_an_error_a_custom_command_is_not_judged_by_the_marker() {
        let cut = Outcome {
            parsed: parse_output("killed 5 sleep 600\n"),
            exit_status: Some(0),
            ..Default::default()
        };
        let r = cut.into_report(&grant(), &resource(None), CloseReason::Retired);
        assert!(
            r.error
                .as_deref()
                .unwrap_or_default()
                .contains("did not run to its end"),
            "{r:?}"
        );
        assert_eq!(r.killed.len(), 1);
        assert_eq!(r.user, "deploy");
        let custom = Outcome {
            parsed: parse_output("all clean\n"),
            exit_status: Some(0),
            ..Default::default()
        };
        let r = custom.into_report(
            &grant(),
            &resource(Some("/usr/local/bin/cleanup")),
            CloseReason::Expired,
        );
        assert_eq!(
            (r.error, r.other_output),
            (None, vec!["all clean".to_string()])
        );
        let skipped = Outcome {
            skipped: Some("busy".into()),
            ..Default::default()
        };
        assert_eq!(
            skipped
                .into_report(&grant(), &resource(None), CloseReason::Retired)
                .error,
            None
        );
    }

    #[tokio::test]
    async fn reports_wait_for_a_connection_and_go_out_in_order() {
        let t = Teardowns::default();
        let frame = |id: &str| {
            let mut r =
                Outcome::default().into_report(&grant(), &resource(None), CloseReason::Retired);
            r.endpoint_id = id.into();
            ToGateway::SshTeardown(r)
        };
        t.report(frame("a"));
        t.report(frame("b"));
        let (tx, mut rx) = mpsc::channel(8);
        t.connected(&tx);
        t.report(frame("c"));
        for want in ["a", "b", "c"] {
            match rx.recv().await {
                Some(ToGateway::SshTeardown(r)) => assert_eq!(r.endpoint_id, want),
                other => panic!("{other:?}"),
            }
        }
    }
}
