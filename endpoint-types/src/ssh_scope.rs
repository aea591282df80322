//! What an SSH endpoint's session may start, what of it is recorded, and what the endpoint's
//! end undoes on the VM. Pure: the gateway and the agent both decide with these functions, so
//! neither can be talked into something the other would refuse.
//!
//! File transfer (`sftp = false`): the sftp subsystem and the server ends of the standard
//! tools are refused: `scp -t|-f` (legacy scp), `rsync --server`, `sftp-server` and
//! `internal-sftp` run as a command. This stops the file-transfer protocols, not a shell:
//! `cat > f` still writes a file, and then the recording (which keeps an exec's input) shows it.

use crate::resource::CloseReason;
use serde::{Deserialize, Serialize};

/// Why a session start is refused, for the engineer and both trails.
pub const SFTP_REFUSED: &str = "sftp is not allowed on this resource";
pub const SCP_REFUSED: &str = "scp is not allowed on this resource";
pub const RSYNC_REFUSED: &str = "rsync is not allowed on this resource";
pub const SFTP_SERVER_REFUSED: &str = "running an sftp server is not allowed on this resource";
pub const UNKNOWN_SUBSYSTEM: &str = "unknown subsystem";

/// Whether a session that runs `command` or `subsystem` may start. `Err` carries the reason.
pub fn check_start(
    command: Option<&str>,
    subsystem: Option<&str>,
    sftp_allowed: bool,
) -> Result<(), &'static str> {
    match (command, subsystem) {
        (None, Some("sftp")) if sftp_allowed => Ok(()),
        (None, Some("sftp")) => Err(SFTP_REFUSED),
        (None, Some(_)) => Err(UNKNOWN_SUBSYSTEM),
        (Some(cmd), _) if !sftp_allowed => match file_transfer_command(cmd) {
            Some(why) => Err(why),
            None => Ok(()),
        },
        _ => Ok(()),
    }
}

/// The file-transfer server a command line would start, if any (see the module doc).
///
/// The line is cut into atoms the way a shell could join them: quotes and backslashes are
/// dropped (`sc''p` is `scp`), every other shell metacharacter, `=` and whitespace separate
/// (`sh -c "scp -t x"`, `X=scp; $X -t`). This errs on the side of refusing.
pub fn file_transfer_command(cmd: &str) -> Option<&'static str> {
    let atoms = atoms(cmd);
    let base = |a: &str| a.rsplit('/').next().unwrap_or(a).to_string();
    let mut scp = false;
    let mut rsync = false;
    for a in &atoms {
        let name = base(a);
        match name.as_str() {
            "sftp-server" | "internal-sftp" => return Some(SFTP_SERVER_REFUSED),
            "scp" => scp = true,
            "rsync" => rsync = true,
            _ => {}
        }
        if scp && is_scp_server_flags(a) {
            return Some(SCP_REFUSED);
        }
        if rsync && a == "--server" {
            return Some(RSYNC_REFUSED);
        }
    }
    None
}

/// An option cluster of scp's remote end (`-t`, `-f`, `-prt`, `-dtv`): only its own flags.
fn is_scp_server_flags(a: &str) -> bool {
    a.strip_prefix('-').is_some_and(|f| {
        !f.is_empty() && f.chars().all(|c| "dfprtv3".contains(c)) && f.contains(['t', 'f'])
    })
}

fn atoms(cmd: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in cmd.chars() {
        match c {
            '\'' | '"' | '\\' => {}
            c if c.is_whitespace() || ";&|()<>{}$`=,!*?[]#~".contains(c) => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Whether what is sent to the program goes into the recording. Under a pty it is what the
/// engineer types (passwords too), recorded only where the customer asks (`record_input`);
/// without one it is the program's input (`ssh vm bash -s < script.sh`), always recorded.
pub fn records_input(has_pty: bool, record_input: bool) -> bool {
    record_input || !has_pty
}

/// A process the teardown ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KilledProcess {
    pub pid: u32,
    /// Its command line as `/proc` showed it (arguments joined by spaces, capped).
    pub command: String,
}

/// Agent → gateway (and the customer's trail): what an ended SSH endpoint's teardown did on
/// the VM, as its login user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshTeardown {
    pub endpoint_id: String,
    pub resource_id: String,
    pub user: String,
    /// Why the endpoint ended.
    pub reason: CloseReason,
    #[serde(default)]
    pub killed: Vec<KilledProcess>,
    /// Crontab lines removed.
    #[serde(default)]
    pub crontab: Vec<String>,
    /// `at` jobs removed.
    #[serde(default)]
    pub at_jobs: Vec<String>,
    /// `systemctl --user` units stopped.
    #[serde(default)]
    pub units: Vec<String>,
    /// Lines of the teardown's output that are none of the above (a custom command's report).
    #[serde(default)]
    pub other_output: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<u32>,
    /// Why the teardown did not run (another live endpoint still uses the login user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Why the teardown failed or may be incomplete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Lists were cut to keep the report under [`MAX_REPORT_BYTES`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Limits on a report, so one always fits a control frame with room to spare, however much
/// the engineer left behind.
pub const MAX_REPORT_ITEMS: usize = 2000;
pub const MAX_REPORT_LINE: usize = 512;
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

impl SshTeardown {
    /// Caps every list and line (the gateway applies it again to what it receives).
    pub fn capped(mut self) -> SshTeardown {
        fn cap_line(s: &mut String) {
            if s.len() > MAX_REPORT_LINE {
                let mut end = MAX_REPORT_LINE;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
        }
        self.killed.truncate(MAX_REPORT_ITEMS);
        self.killed
            .iter_mut()
            .for_each(|k| cap_line(&mut k.command));
        for list in [
            &mut self.crontab,
            &mut self.at_jobs,
            &mut self.units,
            &mut self.other_output,
        ] {
            list.truncate(MAX_REPORT_ITEMS);
            list.iter_mut().for_each(cap_line);
        }
        for s in [&mut self.endpoint_id, &mut self.resource_id, &mut self.user]
            .into_iter()
            .chain(self.skipped.as_mut())
            .chain(self.error.as_mut())
        {
            cap_line(s);
        }
        // JSON escaping can grow a line sixfold: halve the lists until the whole fits.
        while serde_json::to_vec(&self).map_or(0, |v| v.len()) > MAX_REPORT_BYTES {
            self.truncated = true;
            self.killed.truncate(self.killed.len() / 2);
            for list in [
                &mut self.crontab,
                &mut self.at_jobs,
                &mut self.units,
                &mut self.other_output,
            ] {
                list.truncate(list.len() / 2);
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_transfer_servers_are_refused_when_sftp_is_off() {
        let refused: &[(&str, &str)] = &[
            ("scp -t /tmp", SCP_REFUSED),
            ("scp -f /etc/passwd", SCP_REFUSED),
            ("scp -v -r -d -t -- /tmp/x", SCP_REFUSED),
            ("scp -pt /tmp", SCP_REFUSED),
            ("/usr/bin/scp -f x", SCP_REFUSED),
            ("sh -c 'scp -t /tmp'", SCP_REFUSED),
            ("sc''p -t /tmp", SCP_REFUSED),
            ("X=scp; $X -t /tmp", SCP_REFUSED),
            ("true && exec scp -t .", SCP_REFUSED),
            (
                "rsync --server -vlogDtpre.iLsfxCIvu . /tmp/x",
                RSYNC_REFUSED,
            ),
            (
                "rsync --server --sender -vlogDtpre.iLsfxCIvu . /etc",
                RSYNC_REFUSED,
            ),
            ("/usr/bin/rsync --server . x", RSYNC_REFUSED),
            ("bash -c \"rsync --server . /tmp\"", RSYNC_REFUSED),
            ("/usr/lib/openssh/sftp-server", SFTP_SERVER_REFUSED),
            (
                "exec /usr/libexec/openssh/sftp-server -e",
                SFTP_SERVER_REFUSED,
            ),
            ("sftp-server", SFTP_SERVER_REFUSED),
            ("internal-sftp", SFTP_SERVER_REFUSED),
            ("env PATH=/usr/lib/openssh sftp-server", SFTP_SERVER_REFUSED),
        ];
        for (cmd, why) in refused {
            assert_eq!(check_start(Some(cmd), None, false), Err(*why), "{cmd}");
            assert_eq!(
                check_start(Some(cmd), None, true),
                Ok(()),
                "{cmd} with sftp allowed"
            );
        }
        let allowed = [
            "whoami",
            "tail -n 50 /var/log/syslog",
            "rsync -a /srv/a /srv/b",
            "scp -o StrictHostKeyChecking=no backup.tar other:/b",
            "grep -f patterns file",
            "cat > /tmp/notes.txt",
            "bash -s",
        ];
        for cmd in allowed {
            assert_eq!(check_start(Some(cmd), None, false), Ok(()), "{cmd}");
        }
    }

    #[test]
    fn subsystems() {
        assert_eq!(check_start(None, Some("sftp"), false), Err(SFTP_REFUSED));
        assert_eq!(check_start(None, Some("sftp"), true), Ok(()));
        assert_eq!(
            check_start(None, Some("netconf"), true),
            Err(UNKNOWN_SUBSYSTEM)
        );
        assert_eq!(check_start(None, None, false), Ok(()));
    }

    #[test]
    fn input_is_recorded_without_a_pty_or_when_asked() {
        assert!(records_input(false, false));
        assert!(records_input(false, true));
        assert!(records_input(true, true));
        assert!(!records_input(true, false));
    }

    #[test]
    fn reports_are_capped() {
        let r = SshTeardown {
            endpoint_id: "ep".into(),
            resource_id: "r".into(),
            user: "u".into(),
            reason: CloseReason::Retired,
            killed: (0..3000)
                .map(|pid| KilledProcess {
                    pid,
                    command: "é".repeat(600),
                })
                .collect(),
            crontab: vec!["x".repeat(2000)],
            at_jobs: vec![],
            units: vec![],
            other_output: vec![],
            exit_status: Some(0),
            skipped: None,
            error: None,
            truncated: false,
        };
        let small = SshTeardown {
            killed: r.killed[..10].to_vec(),
            ..r.clone()
        }
        .capped();
        assert!(!small.truncated);
        assert!(small
            .killed
            .iter()
            .all(|k| k.command.len() <= MAX_REPORT_LINE));
        assert_eq!(small.crontab[0].len(), MAX_REPORT_LINE);
        // Control characters escape to six bytes each in JSON.
        let r = SshTeardown {
            other_output: vec!["\u{1}".repeat(500); 3000],
            ..r
        }
        .capped();
        assert!(r.truncated);
        assert!(serde_json::to_vec(&r).unwrap().len() <= MAX_REPORT_BYTES);
        assert!(!r.killed.is_empty() && r.killed.len() <= MAX_REPORT_ITEMS);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<SshTeardown>(&json).unwrap(), r);
    }
}
