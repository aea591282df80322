//! End to end: the approval webhook goes out over https to a real receiver (its own test CA
//! given as `--receiver-ca-file`), signed with the secret shown once when it was set; a failing
//! receiver gets retries with backoff, across a gateway restart, until it is delivered; private
//! and metadata targets and plain http are refused, a name resolving to loopback at delivery.

use anyhow::{anyhow, bail, Result};
use postern::testbed::{wait_until, Gateway};
use postern::webhook_receiver::{Received, WebhookReceiver};
use serde_json::Value;
use std::{path::Path, time::Duration};

const CUSTOMER: &str = "acme-corp";

fn receiver_ca(dir: &Path, hook: &WebhookReceiver) -> Result<String> {
    let p = dir.join("receiver-ca.pem");
    std::fs::write(&p, &hook.ca_pem)?;
    Ok(p.to_string_lossy().into_owned())
}

/// An appliance (no agent needed) whose access requests wait for the customer.
fn appliance(gw: &Gateway, app: &str) -> Result<()> {
    gw.cli(&["appliance", "add", "--app", app, "--customer", CUSTOMER])?
        .ok()?;
    Ok(())
}

/// A grant request that waits for the customer's approver: the webhook's event.
fn waiting_request(gw: &Gateway, app: &str) -> Result<String> {
    let g = gw
        .cli(&[
            "access",
            "request",
            "--app",
            app,
            "--customer",
            CUSTOMER,
            "--level",
            "operate",
            "--duration",
            "30m",
            "--reason",
            "INC-7 webhook test",
        ])?
        .ok()?;
    if g["state"] != "pending-approval" {
        bail!("the request does not wait for approval: {g}");
    }
    g["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id in {g}"))
}

fn set_webhook(gw: &Gateway, url: &str, extra: &[&str]) -> Result<postern::testbed::CliOutput> {
    let mut args = vec!["approvals", "webhook", "--customer", CUSTOMER, "--url", url];
    args.extend_from_slice(extra);
    gw.cli(&args)
}

fn deliveries(gw: &Gateway) -> Result<Vec<Value>> {
    let v = gw
        .cli(&["approvals", "webhook", "status", "--customer", CUSTOMER])?
        .ok()?;
    v["deliveries"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("no deliveries in {v}"))
}

/// Waits (bounded) until the only delivery satisfies `ready`; returns it.
fn delivery_when(gw: &Gateway, limit: Duration, ready: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    let ok = wait_until(limit, || match deliveries(gw) {
        Ok(d) if d.len() == 1 => {
            last = d[0].clone();
            ready(&last)
        }
        _ => false,
    });
    if !ok {
        bail!("the delivery never got there; last seen: {last}");
    }
    Ok(last)
}

/// A receiver's own check, written from the README's description (not with the gateway's
/// code): HMAC-SHA256 with the secret's text as key over "<t>.<body>", hex, constant time.
fn verify_signature(secret: &str, r: &Received) -> Result<i64> {
    let header = r
        .signature
        .as_deref()
        .ok_or_else(|| anyhow!("unsigned: {r:?}"))?;
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<i64>()?),
            Some(("v1", v)) => v1 = Some(v.to_string()),
            _ => {}
        }
    }
    let (t, v1) = t.zip(v1).ok_or_else(|| anyhow!("bad header {header:?}"))?;
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&r.body);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = (0..v1.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(v1.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<Vec<u8>, _>>()?;
    ring::hmac::verify(&key, &signed, &tag).map_err(|_| anyhow!("signature mismatch"))?;
    let age = jiff::Timestamp::now().as_second() - t;
    if !(-300..=300).contains(&age) {
        bail!("signature timestamp {t} is {age} s off");
    }
    Ok(t)
}

#[test]
fn signed_deliveries_reach_an_https_receiver_and_verify_with_the_secret_shown_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    appliance(&gw, "hook-app")?;
    let hook = WebhookReceiver::start(0)?;
    let ca = receiver_ca(dir.path(), &hook)?;
    let url = format!("https://{}/hooks/postern", hook.addr);
    let set = set_webhook(&gw, &url, &["--receiver-ca-file", &ca, "--allow-private"])?.ok()?;
    let secret = set["secret"]
        .as_str()
        .ok_or_else(|| anyhow!("no secret in {set}"))?
        .to_string();
    assert!(secret.starts_with("whsec_") && secret.len() > 40, "{set}");
    assert_eq!(set["webhook_url"], url.as_str());
    assert_eq!(
        (set["allow_private"].as_bool(), set["ca"].as_str()),
        (Some(true), Some("custom"))
    );

    let gid = waiting_request(&gw, "hook-app")?;
    let got = hook
        .recv(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("no delivery reached the receiver"))?;
    verify_signature(&secret, &got)?;
    let body: Value = serde_json::from_slice(&got.body)?;
    assert_eq!(body["event"], "approval.waiting");
    assert_eq!(body["id"], gid.as_str());
    assert_eq!(body["customer"], CUSTOMER);
    assert_eq!(body["delivery"].as_str(), got.delivery.as_deref());
    assert_eq!(
        (got.method.as_str(), got.path.as_str()),
        ("POST", "/hooks/postern")
    );
    assert_eq!(got.host, hook.addr.to_string());
    // A body changed in transit, or another customer's secret, does not verify.
    // (Always a change: an edit of some character could find none to edit in a given body.)
    let mut tampered = got.clone();
    tampered.body =
        serde_json::to_vec(&serde_json::json!({"event": "approval.waiting", "id": "gr_forged"}))?;
    assert_ne!(tampered.body, got.body);
    assert!(verify_signature(&secret, &tampered).is_err());
    let mut appended = got.clone();
    appended.body.push(b' ');
    assert!(verify_signature(&secret, &appended).is_err());
    assert!(verify_signature("whsec_other", &got).is_err());

    let d = delivery_when(&gw, Duration::from_secs(20), |d| d["state"] == "delivered")?;
    assert_eq!(d["id"].as_str(), got.delivery.as_deref());
    assert_eq!(d["event"], "approval.waiting");
    assert_eq!(d["target"], url.as_str());
    assert_eq!(
        (d["attempts"].as_u64(), d["last_status"].as_u64()),
        (Some(1), Some(204))
    );
    assert!(
        d["delivered_at"].is_string() && d["next_attempt_at"].is_null(),
        "{d}"
    );
    assert!(d["last_error"].is_null(), "{d}");

    // The secret was shown once: not in the status, the trail or the gateway's log.
    let status = gw.cli(&["approvals", "webhook", "status"])?.ok()?;
    let audit = gw.cli(&["audit", "list", "--limit", "100"])?.ok()?;
    let log = std::fs::read_to_string(&gw.log)?;
    for (what, text) in [
        ("status", status.to_string()),
        ("audit", audit.to_string()),
        ("log", log),
    ] {
        assert!(!text.contains(&secret[6..]), "the secret is in the {what}");
    }
    assert!(audit.to_string().contains("webhook.set"));

    // Setting it again makes a new secret; the old one no longer verifies new deliveries.
    let again = set_webhook(&gw, &url, &["--receiver-ca-file", &ca, "--allow-private"])?.ok()?;
    let secret2 = again["secret"].as_str().unwrap_or_default().to_string();
    assert_ne!(secret2, secret);
    appliance(&gw, "hook-app-2")?;
    waiting_request(&gw, "hook-app-2")?;
    let got2 = hook
        .recv(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("no second delivery"))?;
    verify_signature(&secret2, &got2)?;
    assert!(verify_signature(&secret, &got2).is_err());
    Ok(())
}

#[test]
fn a_failing_receiver_gets_retries_across_a_restart_until_delivered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("gw");
    let mut gw = Gateway::start(&data)?;
    appliance(&gw, "retry-app")?;
    // 503 until told otherwise.
    let hook = WebhookReceiver::start(usize::MAX)?;
    let ca = receiver_ca(dir.path(), &hook)?;
    let url = format!("https://localhost:{}/h", hook.addr.port());
    let secret = set_webhook(&gw, &url, &["--receiver-ca-file", &ca, "--allow-private"])?.ok()?
        ["secret"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    waiting_request(&gw, "retry-app")?;

    // Two refused attempts, each signed afresh; the delivery stays pending with what happened.
    let first = hook
        .recv(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("no attempt"))?;
    let second = hook
        .recv(Duration::from_secs(30))
        .ok_or_else(|| anyhow!("no retry"))?;
    assert_eq!((first.status, second.status), (503, 503));
    assert_eq!(first.delivery, second.delivery);
    assert_eq!(first.body, second.body);
    assert_eq!(second.host, format!("localhost:{}", hook.addr.port()));
    let (t1, t2) = (
        verify_signature(&secret, &first)?,
        verify_signature(&secret, &second)?,
    );
    assert!(t2 >= t1);
    let pending = delivery_when(&gw, Duration::from_secs(20), |d| {
        d["attempts"].as_u64() >= Some(2)
    })?;
    assert_eq!(pending["state"], "pending", "{pending}");
    assert_eq!(pending["last_status"].as_u64(), Some(503));
    assert!(pending["last_error"]
        .as_str()
        .unwrap_or_default()
        .contains("503"));
    assert!(pending["next_attempt_at"].is_string() && pending["delivered_at"].is_null());

    // The gateway dies; the receiver recovers; the restarted gateway resumes the delivery.
    let (api, relay) = (gw.api, gw.relay);
    gw.kill();
    hook.fail_next(0);
    let gw = Gateway::start_on(&data, api, relay)?;
    let done = delivery_when(&gw, Duration::from_secs(90), |d| d["state"] == "delivered")?;
    assert_eq!(done["id"].as_str(), first.delivery.as_deref());
    assert_eq!(done["last_status"].as_u64(), Some(204));
    assert!(
        done["attempts"].as_u64() > pending["attempts"].as_u64(),
        "{done}"
    );
    let mut last = None;
    while let Some(r) = hook.recv(Duration::from_secs(1)) {
        last = Some(r);
    }
    let last = last.ok_or_else(|| anyhow!("the delivered attempt never arrived"))?;
    assert_eq!(
        (last.status, last.delivery.as_deref()),
        (204, first.delivery.as_deref())
    );
    verify_signature(&secret, &last)?;
    Ok(())
}

#[test]
fn private_and_metadata_targets_and_plain_http_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw = Gateway::start(&dir.path().join("gw"))?;
    appliance(&gw, "ssrf-app")?;
    let hook = WebhookReceiver::start(0)?;
    let ca = receiver_ca(dir.path(), &hook)?;

    let plain = set_webhook(
        &gw,
        &format!("http://{}/h", hook.addr),
        &["--allow-private"],
    )?;
    assert_eq!(plain.error_code(), Some("INVALID_REQUEST"), "{plain:?}");
    assert!(plain.json["error"]["hint"]
        .as_str()
        .unwrap_or_default()
        .contains("https://"));

    let loopback = set_webhook(
        &gw,
        &format!("https://{}/h", hook.addr),
        &["--receiver-ca-file", &ca],
    )?;
    assert_eq!(loopback.error_code(), Some("FORBIDDEN"), "{loopback:?}");
    assert!(loopback.json["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("loopback"));
    assert!(loopback.json["error"]["hint"]
        .as_str()
        .unwrap_or_default()
        .contains("--allow-private"));

    // Metadata services stay refused even with --allow-private.
    for url in [
        "https://169.254.169.254/latest/meta-data/",
        "https://[fd00:ec2::254]/latest/meta-data/",
        "https://0.0.0.0:8443/",
    ] {
        for extra in [&[][..], &["--allow-private"][..]] {
            let r = set_webhook(&gw, url, extra)?;
            assert_eq!(r.error_code(), Some("FORBIDDEN"), "{url} {extra:?}: {r:?}");
        }
    }
    // Only an admin allows private targets.
    let bob = gw
        .cli(&[
            "token",
            "create",
            "--role",
            "approver",
            "--name",
            "bob@acme.example",
            "--customer",
            CUSTOMER,
        ])?
        .ok()?["token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let by_approver = gw.cli_as(
        &bob,
        &[
            "approvals",
            "webhook",
            "--customer",
            CUSTOMER,
            "--url",
            &format!("https://{}/h", hook.addr),
            "--receiver-ca-file",
            &ca,
            "--allow-private",
        ],
    )?;
    assert_eq!(
        by_approver.error_code(),
        Some("FORBIDDEN"),
        "{by_approver:?}"
    );

    // A name is judged after resolution, at each delivery: `localhost` is loopback, so the
    // delivery is refused without a connection, and the refusal is in the status.
    let url = format!("https://localhost:{}/h", hook.addr.port());
    set_webhook(&gw, &url, &["--receiver-ca-file", &ca])?.ok()?;
    waiting_request(&gw, "ssrf-app")?;
    let d = delivery_when(&gw, Duration::from_secs(30), |d| {
        d["attempts"].as_u64() >= Some(2)
    })?;
    let error = d["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("refused target") && error.contains("loopback"),
        "{d}"
    );
    assert_eq!(d["state"], "pending");
    assert!(
        d["last_status"].is_null() && d["delivered_at"].is_null(),
        "{d}"
    );
    assert_eq!(hook.connections(), 0, "the refused target was connected to");
    assert!(hook.recv(Duration::from_millis(100)).is_none());
    Ok(())
}
