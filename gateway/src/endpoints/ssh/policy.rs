//! What a session channel may ask for, as a pure state machine per channel.
//!
//! The russh handler feeds every channel request here and sends the reply it gets back; what
//! is accepted goes on to the agent. Refused: X11 and agent forwarding, environment beyond
//! `TERM`/`LANG`, a second pty or program, subsystems other than sftp, and file transfer
//! (the sftp subsystem, the scp/rsync/sftp-server execs of [`ssh_scope::check_start`])
//! unless the customer's scope allows sftp. Port forwarding is refused at the connection level (those are
//! global requests and channel types, not channel requests).

use endpoint_types::{
    ssh_scope,
    ssh_stream::{PtyRequest, SshStart},
};

/// Environment variables a client may set; anything else could change how the upstream
/// shell or its programs behave (`LD_PRELOAD`, `PATH`, `BASH_ENV`).
pub const ALLOWED_ENV: &[&str] = &["TERM", "LANG"];
const MAX_ENV_VALUE: usize = 256;
const MAX_COMMAND: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Pty(PtyRequest),
    Env {
        name: String,
        value: String,
    },
    Shell,
    Exec(Vec<u8>),
    Subsystem(String),
    X11,
    AgentForwarding,
    WindowChange {
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
    },
    Signal(String),
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reply success; nothing to forward yet (pty, env before the program starts).
    Accept,
    /// Reply success and start the program upstream with this.
    Start(SshStart),
    /// Forward to the running program (no reply is expected for these).
    Forward(Request),
    /// Reply failure, with why (logged and audited).
    Refuse(&'static str),
}

#[derive(Debug, Default)]
pub struct ChannelPolicy {
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
    started: bool,
    sftp_allowed: bool,
}

impl ChannelPolicy {
    pub fn new(sftp_allowed: bool) -> ChannelPolicy {
        ChannelPolicy {
            sftp_allowed,
            ..Default::default()
        }
    }

    pub fn has_pty(&self) -> bool {
        self.pty.is_some()
    }

    pub fn decide(&mut self, req: Request) -> Decision {
        match req {
            Request::X11 => Decision::Refuse("X11 forwarding is not available through Postern"),
            Request::AgentForwarding => {
                Decision::Refuse("agent forwarding is not available through Postern")
            }
            Request::Pty(_) if self.started => {
                Decision::Refuse("a pty must be requested before the program starts")
            }
            Request::Pty(_) if self.pty.is_some() => {
                Decision::Refuse("this channel already has a pty")
            }
            Request::Pty(p) => {
                if p.term.len() > MAX_ENV_VALUE || p.cols > 10_000 || p.rows > 10_000 {
                    return Decision::Refuse("unreasonable pty request");
                }
                self.pty = Some(p);
                Decision::Accept
            }
            Request::Env { name, value } => {
                if self.started {
                    return Decision::Refuse("environment must be set before the program starts");
                }
                if !ALLOWED_ENV.contains(&name.as_str()) {
                    return Decision::Refuse("only TERM and LANG may be set");
                }
                if value.len() > MAX_ENV_VALUE || value.chars().any(char::is_control) {
                    return Decision::Refuse("unreasonable environment value");
                }
                self.env.retain(|(n, _)| *n != name);
                self.env.push((name, value));
                Decision::Accept
            }
            Request::Shell | Request::Exec(_) | Request::Subsystem(_) if self.started => {
                Decision::Refuse("this channel already runs a program")
            }
            Request::Shell => self.start(None, None),
            Request::Exec(cmd) => {
                if cmd.len() > MAX_COMMAND {
                    return Decision::Refuse("command line too long");
                }
                // Command lines are text; invalid bytes could not be audited faithfully.
                match String::from_utf8(cmd) {
                    // The servers of scp, rsync and sftp run through exec: file transfer,
                    // allowed only where sftp is (the agent applies the same check).
                    Ok(c) => match ssh_scope::check_start(Some(&c), None, self.sftp_allowed) {
                        Ok(()) => self.start(Some(c), None),
                        Err(why) => Decision::Refuse(why),
                    },
                    Err(_) => Decision::Refuse("command line is not UTF-8"),
                }
            }
            Request::Subsystem(name) => {
                match ssh_scope::check_start(None, Some(&name), self.sftp_allowed) {
                    Ok(()) => self.start(None, Some(name)),
                    Err(why) => Decision::Refuse(why),
                }
            }
            Request::WindowChange { .. } if self.pty.is_none() => Decision::Refuse("no pty"),
            r @ (Request::WindowChange { .. } | Request::Signal(_)) => {
                if let Request::WindowChange { cols, rows, .. } = &r {
                    if let Some(p) = self.pty.as_mut() {
                        p.cols = *cols;
                        p.rows = *rows;
                    }
                }
                if self.started {
                    Decision::Forward(r)
                } else {
                    Decision::Accept
                }
            }
        }
    }

    fn start(&mut self, command: Option<String>, subsystem: Option<String>) -> Decision {
        self.started = true;
        Decision::Start(SshStart {
            pty: self.pty.clone(),
            command,
            subsystem,
            env: self.env.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pty() -> PtyRequest {
        PtyRequest {
            term: "xterm".into(),
            cols: 80,
            rows: 24,
            pix_width: 0,
            pix_height: 0,
            modes: vec![],
        }
    }

    fn env(n: &str, v: &str) -> Request {
        Request::Env {
            name: n.into(),
            value: v.into(),
        }
    }

    #[test]
    fn table() {
        use Decision::*;
        let wc = Request::WindowChange {
            cols: 100,
            rows: 30,
            pix_width: 0,
            pix_height: 0,
        };
        // (sftp allowed, requests in order, expected decision of the last one)
        let cases: Vec<(bool, Vec<Request>, Decision)> = vec![
            (
                false,
                vec![Request::X11],
                Refuse("X11 forwarding is not available through Postern"),
            ),
            (
                false,
                vec![Request::AgentForwarding],
                Refuse("agent forwarding is not available through Postern"),
            ),
            (
                false,
                vec![env("LD_PRELOAD", "/x.so")],
                Refuse("only TERM and LANG may be set"),
            ),
            (
                false,
                vec![env("PATH", "/tmp")],
                Refuse("only TERM and LANG may be set"),
            ),
            (false, vec![env("LANG", "C.UTF-8")], Accept),
            (
                false,
                vec![env("LANG", "a\nb")],
                Refuse("unreasonable environment value"),
            ),
            (
                false,
                vec![Request::Pty(pty()), Request::Pty(pty())],
                Refuse("this channel already has a pty"),
            ),
            (
                false,
                vec![Request::Shell, Request::Pty(pty())],
                Refuse("a pty must be requested before the program starts"),
            ),
            (
                false,
                vec![Request::Shell, Request::Exec(b"id".to_vec())],
                Refuse("this channel already runs a program"),
            ),
            (
                false,
                vec![Request::Shell, env("LANG", "C")],
                Refuse("environment must be set before the program starts"),
            ),
            (
                false,
                vec![Request::Exec(vec![0xff])],
                Refuse("command line is not UTF-8"),
            ),
            (
                false,
                vec![Request::Subsystem("sftp".into())],
                Refuse("sftp is not allowed on this resource"),
            ),
            (
                false,
                vec![Request::Exec(b"scp -t /tmp".to_vec())],
                Refuse("scp is not allowed on this resource"),
            ),
            (
                false,
                vec![Request::Exec(b"/usr/bin/scp -f x".to_vec())],
                Refuse("scp is not allowed on this resource"),
            ),
            (
                false,
                vec![Request::Exec(
                    b"rsync --server -logDtpre.iLsfxCIvu . /tmp".to_vec(),
                )],
                Refuse("rsync is not allowed on this resource"),
            ),
            (
                false,
                vec![Request::Exec(b"/usr/lib/openssh/sftp-server".to_vec())],
                Refuse("running an sftp server is not allowed on this resource"),
            ),
            (
                true,
                vec![Request::Exec(b"scp -t /tmp".to_vec())],
                Start(SshStart {
                    pty: None,
                    command: Some("scp -t /tmp".into()),
                    subsystem: None,
                    env: vec![],
                }),
            ),
            (
                true,
                vec![Request::Subsystem("sftp".into())],
                Start(SshStart {
                    pty: None,
                    command: None,
                    subsystem: Some("sftp".into()),
                    env: vec![],
                }),
            ),
            (
                true,
                vec![Request::Subsystem("netconf".into())],
                Refuse("unknown subsystem"),
            ),
            (false, vec![wc.clone()], Refuse("no pty")),
            (
                false,
                vec![Request::Pty(pty()), Request::Shell, wc.clone()],
                Forward(wc.clone()),
            ),
            (
                false,
                vec![Request::Exec(b"id".to_vec()), Request::Signal("INT".into())],
                Forward(Request::Signal("INT".into())),
            ),
            (
                false,
                vec![
                    env("TERM", "vt100"),
                    env("LANG", "C"),
                    env("LANG", "C.UTF-8"),
                    Request::Pty(pty()),
                    wc,
                    Request::Exec(b"top".to_vec()),
                ],
                Start(SshStart {
                    pty: Some(PtyRequest {
                        cols: 100,
                        rows: 30,
                        ..pty()
                    }),
                    command: Some("top".into()),
                    subsystem: None,
                    env: vec![
                        ("TERM".into(), "vt100".into()),
                        ("LANG".into(), "C.UTF-8".into()),
                    ],
                }),
            ),
        ];
        for (sftp, reqs, want) in cases {
            let mut p = ChannelPolicy::new(sftp);
            let mut last = None;
            for r in reqs.clone() {
                last = Some(p.decide(r));
            }
            assert_eq!(last, Some(want), "{reqs:?}");
        }
    }
}
