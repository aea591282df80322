//! The gateway's SSH server (russh): one per connection. Public-key auth picks the endpoint;
//! session channels go to [`super::relay`]; everything else an OpenSSH client may ask for
//! (port forwarding, X11, agent forwarding, extra environment) is refused with the standard
//! failure replies, which `ssh` reports as usual ("administratively prohibited", "remote port
//! forwarding failed", "X11 forwarding request failed").

use super::{
    policy::{ChannelPolicy, Decision, Request},
    relay::{self, Control},
};
use crate::{
    audit::Subject,
    endpoints::{
        credential::CredentialKey, front_ends::FrontEndContext, EndpointRegistry, LiveEndpoint,
    },
};
use endpoint_types::ssh_stream::PtyRequest;
use russh::{
    keys::PublicKey,
    server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey},
    Channel, ChannelId, ChannelOpenFailure, Pty, Sig,
};
use std::{collections::HashMap, net::SocketAddr, sync::Arc};
use tokio::sync::{mpsc, oneshot};

/// Session channels one connection may hold at once (OpenSSH's sshd: MaxSessions 10).
pub const MAX_CHANNELS_PER_CONNECTION: usize = 10;

struct ChannelCtl {
    policy: ChannelPolicy,
    tx: mpsc::Sender<Control>,
}

pub struct Conn {
    ctx: Arc<FrontEndContext>,
    client: SocketAddr,
    endpoint: Option<Arc<LiveEndpoint>>,
    /// The user name the engineer typed; recorded, never used upstream.
    login: String,
    channels: HashMap<ChannelId, ChannelCtl>,
    authenticated: Option<oneshot::Sender<Arc<LiveEndpoint>>>,
}

impl Conn {
    pub fn new(
        ctx: Arc<FrontEndContext>,
        client: SocketAddr,
        authenticated: oneshot::Sender<Arc<LiveEndpoint>>,
    ) -> Conn {
        Conn {
            ctx,
            client,
            endpoint: None,
            login: String::new(),
            channels: HashMap::new(),
            authenticated: Some(authenticated),
        }
    }

    async fn refused(&self, action: &str, reason: &str, extra: serde_json::Value) {
        let Some(ep) = &self.endpoint else { return };
        tracing::info!(endpoint = %ep.id, client = %self.client, action, "refused: {reason}");
        let mut detail = serde_json::json!({
            "action": action, "reason": reason, "client_addr": self.client.to_string(), "code": "FORBIDDEN_BY_SCOPE",
        });
        if let (Some(d), serde_json::Value::Object(m)) = (detail.as_object_mut(), extra) {
            d.extend(m);
        }
        self.ctx
            .audit
            .record(
                "denied",
                &ep.operator,
                Subject::endpoint(&ep.appliance_id, &ep.id),
                detail,
            )
            .await;
    }

    /// A forwarding request refused: the target asked for (a socket path, or a host with
    /// `port`) goes into the record, cut to 255 characters of the peer's text.
    async fn refused_forwarding(
        &self,
        action: &str,
        reason: &str,
        target: &str,
        port: Option<u32>,
    ) {
        let mut target: String = target.chars().take(255).collect();
        if let Some(port) = port {
            target = format!("{target}:{port}");
        }
        self.refused(action, reason, serde_json::json!({ "target": target }))
            .await;
    }

    async fn decide(
        &mut self,
        channel: ChannelId,
        req: Request,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(ctl) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let action = request_name(&req);
        match ctl.policy.decide(req) {
            Decision::Accept => session.channel_success(channel),
            Decision::Start(start) => {
                if ctl.tx.try_send(Control::Start(start)).is_ok() {
                    session.channel_success(channel)
                } else {
                    session.channel_failure(channel)
                }
            }
            Decision::Forward(r) => {
                // Window changes and signals carry no reply; a full queue drops a stale resize.
                let _ = ctl.tx.try_send(Control::Forward(r));
                session.channel_success(channel)
            }
            Decision::Refuse(why) => {
                session.channel_failure(channel)?;
                self.refused(action, why, serde_json::json!({})).await;
                Ok(())
            }
        }
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Pty(_) => "pty",
        Request::Env { .. } => "env",
        Request::Shell => "shell",
        Request::Exec(_) => "exec",
        Request::Subsystem(_) => "subsystem",
        Request::X11 => "x11-forwarding",
        Request::AgentForwarding => "agent-forwarding",
        Request::WindowChange { .. } => "window-change",
        Request::Signal(_) => "signal",
    }
}

/// The live SSH endpoint whose client key this is, if any (by its fingerprint: the comment
/// does not count). Checked again on every use: a retired or expired endpoint is out of the
/// registry (and cancelled) at once.
pub fn endpoint_for_key(live: &EndpointRegistry, key: &PublicKey) -> Option<Arc<LiveEndpoint>> {
    let now = jiff::Timestamp::now();
    live.by_credential(&CredentialKey::of_ssh_key(key)?)
        .filter(|ep| !ep.cancel.is_cancelled() && ep.expires_at > now)
}

pub fn sig_name(s: &Sig) -> String {
    match s {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(c) => c.as_str(),
    }
    .to_string()
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Only keys of live endpoints are worth a signature check.
        Ok(
            if endpoint_for_key(&self.ctx.endpoints, offer.public_key).is_some() {
                Auth::Accept
            } else {
                Auth::reject()
            },
        )
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let Some(ep) = endpoint_for_key(&self.ctx.endpoints, key.public_key) else {
            return Ok(Auth::reject());
        };
        self.login = user.chars().take(64).collect();
        if let Some(tx) = self.authenticated.take() {
            let _ = tx.send(ep.clone());
        }
        tracing::info!(endpoint = %ep.id, client = %self.client, "ssh client authenticated");
        self.endpoint = Some(ep);
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(ep) = self.endpoint.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if self.channels.len() >= MAX_CHANNELS_PER_CONNECTION {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            self.refused(
                "session",
                "too many channels on one connection",
                serde_json::json!({"limit": MAX_CHANNELS_PER_CONNECTION}),
            )
            .await;
            return Ok(());
        }
        let slot = match crate::endpoints::session::SessionSlot::claim(
            &ep,
            self.ctx.limits.sessions_per_endpoint,
        ) {
            Ok(s) => s,
            Err(e) => {
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                let sid = crate::endpoints::session::new_session_id();
                crate::endpoints::session::deny(&*self.ctx.audit, &ep, &sid, self.client, &e).await;
                return Ok(());
            }
        };
        reply.accept().await;
        let sftp = matches!(
            self.ctx.scope_of(&ep),
            Some(endpoint_types::resource::ResourceScope::Ssh { sftp: true, .. })
        );
        let (tx, rx) = mpsc::channel(64);
        let id = channel.id();
        self.channels.insert(
            id,
            ChannelCtl {
                policy: ChannelPolicy::new(sftp),
                tx,
            },
        );
        let channel_ctx = relay::ChannelCtx {
            ctx: self.ctx.clone(),
            ep,
            client: self.client,
            login: self.login.clone(),
            slot,
            handle: session.handle(),
        };
        self.ctx.tasks.spawn(relay::run(channel_ctx, channel, rx));
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _c: Channel<Msg>,
        _a: &str,
        _p: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        self.refused(
            "x11-forwarding",
            "X11 forwarding is not available through Postern",
            serde_json::json!({}),
        )
        .await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _c: Channel<Msg>,
        host: &str,
        port: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        self.refused_forwarding(
            "port-forwarding",
            "port forwarding is not available through Postern",
            host,
            Some(port),
        )
        .await;
        Ok(())
    }

    async fn channel_open_forwarded_tcpip(
        &mut self,
        _c: Channel<Msg>,
        _h: &str,
        _p: u32,
        _oa: &str,
        _op: u32,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _c: Channel<Msg>,
        path: &str,
        reply: ChannelOpenHandle,
        _s: &mut Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        self.refused_forwarding(
            "port-forwarding",
            "socket forwarding is not available through Postern",
            path,
            None,
        )
        .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _s: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refused_forwarding(
            "remote-forwarding",
            "remote port forwarding is not available through Postern",
            address,
            Some(*port),
        )
        .await;
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        path: &str,
        _s: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.refused_forwarding(
            "remote-forwarding",
            "remote socket forwarding is not available through Postern",
            path,
            None,
        )
        .await;
        Ok(false)
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _s: &mut Session,
    ) -> Result<bool, Self::Error> {
        // russh sends the failure reply for a `false`.
        if let Some(ctl) = self.channels.get_mut(&channel) {
            if let Decision::Refuse(why) = ctl.policy.decide(Request::AgentForwarding) {
                self.refused("agent-forwarding", why, serde_json::json!({}))
                    .await;
            }
        }
        Ok(false)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _proto: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(channel, Request::X11, session).await
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let req = Request::Env {
            name: name.chars().take(256).collect(),
            value: value.chars().take(1024).collect(),
        };
        self.decide(channel, req, session).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let pty = PtyRequest {
            term: term.chars().take(1024).collect(),
            cols,
            rows,
            pix_width,
            pix_height,
            modes: modes.iter().map(|(p, v)| (*p as u8, *v)).collect(),
        };
        self.decide(channel, Request::Pty(pty), session).await
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(channel, Request::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(channel, Request::Exec(data.to_vec()), session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(
            channel,
            Request::Subsystem(name.chars().take(64).collect()),
            session,
        )
        .await
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(
            channel,
            Request::WindowChange {
                cols,
                rows,
                pix_width,
                pix_height,
            },
            session,
        )
        .await
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.decide(channel, Request::Signal(sig_name(&signal)), session)
            .await
    }
}
