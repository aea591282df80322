//! What the gateway's and the agent's operator listeners serve (`/metrics`, `/healthz`,
//! `/readyz`), read with a plain HTTP/1.1 client as a scraper or a load balancer reads them.

use anyhow::{anyhow, bail, Result};
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// One HTTP/1.1 GET; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP header end in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("no status in {head:?}"))?
        .parse()?;
    Ok((status, body.to_string()))
}

/// The value of the sample `series` (`name{labels}`, labels exactly as encoded), if present.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The listener at `addr` is live (`/healthz` 200), ready (`/readyz` 200) and serves nothing
/// else (404).
pub fn healthy_and_ready(addr: SocketAddr) -> Result<()> {
    let (live, body) = http_get(addr, "/healthz")?;
    if live != 200 {
        bail!("/healthz answered {live}: {body}");
    }
    let (ready, why) = http_get(addr, "/readyz")?;
    if ready != 200 {
        bail!("/readyz answered {ready}: {why}");
    }
    let (other, _) = http_get(addr, "/nothing-here")?;
    if other != 404 {
        bail!("/nothing-here answered {other}, not 404");
    }
    Ok(())
}
