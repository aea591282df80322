//! End to end: both trails carry signed heads and anchor each other's, so cutting records off
//! the end of either (the agent's file, the gateway's store), or putting a shorter valid chain
//! in its place, fails `audit verify`, naming the missing head. Real `postern server` and
//! `postern-agent` processes; the store is edited with SQL on its SQLite file.

use anyhow::{anyhow, Context, Result};
use postern::tcp_endpoint::{self, Forwarder};
use postern::testbed::{echo_round_trip, echo_server, wait_until, Agent, CliOutput, Gateway};
use serde_json::Value;
use std::{net::SocketAddr, path::Path, time::Duration};

const APP: &str = "heads-app";

fn tcp_resource(target: SocketAddr) -> String {
    format!("[policy]\napproval = \"automatic\"\n\n[[resource]]\nid = \"null_resource.echo\"\nkind = \"tcp\"\ntarget = \"{target}\"\n")
}

fn vendor_trail(gw: &Gateway) -> Result<Vec<Value>> {
    let list = gw.cli(&["audit", "list"])?.ok()?;
    Ok(list["records"].as_array().cloned().unwrap_or_default())
}

/// SQL on the gateway's SQLite file, as anyone with access to it could run.
fn sql(db: &Path, statement: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use sqlx::ConnectOptions;
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(db)
            .connect()
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
            .execute(&mut conn)
            .await?;
        anyhow::Ok(())
    })
}

/// The verify failed naming the head at `seq` as missing.
fn names_missing_head(out: &CliOutput, seq: i64) -> Result<()> {
    if out.success {
        return Err(anyhow!("verify passed: {}", out.json));
    }
    let e = &out.json["error"];
    anyhow::ensure!(e["code"] == "AUDIT_CHAIN_BROKEN", "{e}");
    anyhow::ensure!(e["details"]["missing_head"]["seq"] == seq, "{e}");
    anyhow::ensure!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("is missing"),
        "{e}"
    );
    Ok(())
}

fn head_seqs(trail: &[Value]) -> Vec<i64> {
    trail
        .iter()
        .filter(|r| r["kind"] == "audit.head")
        .filter_map(|r| r["seq"].as_i64())
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) -> Result<()> {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

#[test]
fn cut_or_replaced_trails_fail_verification_naming_the_missing_head() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gw_dir = dir.path().join("gw");
    let mut gw = Gateway::start(&gw_dir)?;
    let echo = echo_server()?;
    let mut agent = Agent::enroll(
        &gw,
        &dir.path().join("agent"),
        APP,
        "acme-corp",
        &tcp_resource(echo),
    )?;
    // The gateway audit key was pinned at enrollment, beside the CA.
    let pinned = std::fs::read_to_string(dir.path().join("agent/gateway-audit.pub"))?;
    assert_eq!(
        pinned.trim(),
        std::fs::read_to_string(gw_dir.join("audit-key.pub"))?.trim()
    );
    agent.run()?;
    anyhow::ensure!(
        gw.wait_online(&agent.appliance_id, Duration::from_secs(30)),
        "agent never came online: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let grant = gw.request_operate(APP, "acme-corp", "1h")?;
    assert_eq!(grant["state"], "active", "{grant}");
    let home = dir.path().join("home");
    let ep = tcp_endpoint::create(&gw, &home, APP, "acme-corp", "null_resource.echo")?;
    let fwd = Forwarder::start(
        &gw,
        &gw.admin_token,
        &home,
        ep["id"].as_str().unwrap_or_default(),
    )?;
    // Sixty sessions: two records each in both trails, so each side signs a head by count.
    for i in 0..60u8 {
        assert_eq!(echo_round_trip(fwd.listen, &[i; 16])?, vec![i; 16]);
    }

    // Each side's head reaches the other and is recorded there as an anchor.
    let trail = agent.trail_when(|t| {
        t.len() > 100 && !head_seqs(t).is_empty() && t.iter().any(|r| r["kind"] == "audit.anchor")
    })?;
    assert!(
        !head_seqs(&trail).is_empty(),
        "no head in the customer trail"
    );
    let gateway_anchor = trail
        .iter()
        .find(|r| r["kind"] == "audit.anchor")
        .ok_or_else(|| anyhow!("the gateway's head never reached the customer trail"))?;
    assert_eq!(gateway_anchor["detail"]["trail"], "gateway");
    let mut vendor = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        vendor = vendor_trail(&gw).unwrap_or_default();
        vendor.iter().any(|r| r["kind"] == "audit.anchor")
    }));
    let anchor = vendor
        .iter()
        .find(|r| r["kind"] == "audit.anchor")
        .ok_or_else(|| anyhow!("no anchor"))?;
    assert_eq!(anchor["appliance_id"], agent.appliance_id.as_str());
    assert_eq!(anchor["detail"]["trail"], "appliance");
    assert!(
        !head_seqs(&vendor).is_empty(),
        "no head in the vendor trail"
    );

    // Untouched, both verify, with their heads and the other side's anchors.
    let v = gw.cli(&["audit", "verify"])?.ok()?;
    assert_eq!(v["ok"], true);
    assert!(v["heads"]["heads"].as_u64() >= Some(1), "{v}");
    assert!(v["heads"]["anchors"].as_u64() >= Some(1), "{v}");
    let v = agent.verify_trail()?.ok()?;
    assert_eq!(v["ok"], true);
    assert!(v["heads"]["anchors"].as_u64() >= Some(1), "{v}");
    assert_eq!(
        v["heads"]["compared_with"].as_array().map(Vec::len),
        Some(1),
        "{v}"
    );

    // What the gateway anchored of this appliance, for the customer to check against.
    let anchored = gw
        .cli(&["audit", "anchor", "--appliance", &agent.appliance_id])?
        .ok()?;
    let anchored_seq = anchored["anchor"]["seq"].as_i64().context("anchored seq")?;
    let anchor_file = dir.path().join("anchor.json");
    std::fs::write(&anchor_file, anchored.to_string())?;

    // Both stop, each signing the end of its trail.
    drop(fwd);
    agent.stop();
    gw.stop();

    // --- The customer trail (a file) ---
    let path = agent.trail_path();
    let original = std::fs::read_to_string(&path)?;
    let lines: Vec<String> = original.lines().map(str::to_string).collect();
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    let heads = head_seqs(&records);
    let last_head = *heads.last().context("heads")?;
    assert_eq!(
        last_head,
        lines.len() as i64,
        "the agent's last record is its shutdown head"
    );
    let v = agent.verify_trail_with(&["--anchor", anchor_file.to_str().unwrap_or_default()])?;
    assert_eq!(
        v.ok()?["heads"]["compared_with"].as_array().map(Vec::len),
        Some(2)
    );

    // The last records cut off: the head kept beside the trail is missing.
    write_lines(&path, &lines[..lines.len() - 3])?;
    names_missing_head(&agent.verify_trail()?, last_head)?;
    // Also when the head file is gone too: the head the gateway anchored is missing.
    write_lines(&path, &lines[..anchored_seq as usize - 1])?;
    let head_file = path.with_file_name("audit.jsonl.head");
    let kept_head = std::fs::read(&head_file)?;
    std::fs::remove_file(&head_file)?;
    names_missing_head(
        &agent.verify_trail_with(&["--anchor", anchor_file.to_str().unwrap_or_default()])?,
        anchored_seq,
    )?;
    std::fs::write(&head_file, kept_head)?;
    // A shorter valid chain in its place (ending at a genuine signed head): still missing.
    write_lines(&path, &lines[..heads[0] as usize])?;
    names_missing_head(&agent.verify_trail()?, last_head)?;
    // Restored, it verifies again.
    std::fs::write(&path, &original)?;
    assert_eq!(agent.verify_trail()?.ok()?["ok"], true);

    // --- The vendor trail (the store) ---
    let db = gw_dir.join("postern.db");
    let pristine = dir.path().join("gw-pristine");
    copy_dir(&gw_dir, &pristine)?;

    // The last rows deleted while the gateway is down.
    let mut vendor_heads = Vec::new();
    {
        let gw2 = Gateway::start(&gw_dir)?;
        // (Started once untouched: it verifies, and its head file names its shutdown head.)
        let v = gw2.cli(&["audit", "verify"])?.ok()?;
        assert_eq!(v["ok"], true, "{v}");
        vendor_heads.extend(head_seqs(&vendor_trail(&gw2)?));
    }
    let head_file: Value = serde_json::from_slice(&std::fs::read(gw_dir.join("audit-head.json"))?)?;
    let vendor_last_head = head_file["seq"].as_i64().context("head file seq")?;
    sql(
        &db,
        "DELETE FROM audit_log WHERE seq > (SELECT MAX(seq) - 3 FROM audit_log)",
    )?;
    let gw3 = Gateway::start(&gw_dir)?;
    names_missing_head(&gw3.cli(&["audit", "verify"])?, vendor_last_head)?;
    // The finding is in the trail and stays named after later heads.
    let kinds: Vec<Value> = vendor_trail(&gw3)?;
    assert!(kinds.iter().any(|r| r["kind"] == "audit.head_missing"));
    drop(gw3);

    // The whole store replaced by a shorter valid chain (the gateway starts a new one).
    let replaced_dir = dir.path().join("gw-replaced");
    copy_dir(&pristine, &replaced_dir)?;
    let pristine_head: Value =
        serde_json::from_slice(&std::fs::read(pristine.join("audit-head.json"))?)?;
    sql(&replaced_dir.join("postern.db"), "DELETE FROM audit_log")?;
    let gw4 = Gateway::start(&replaced_dir)?;
    names_missing_head(
        &gw4.cli(&["audit", "verify"])?,
        pristine_head["seq"].as_i64().context("seq")?,
    )?;
    drop(gw4);

    // And the untouched copy verifies.
    let gw5 = Gateway::start(&pristine)?;
    assert_eq!(gw5.cli(&["audit", "verify"])?.ok()?["ok"], true);
    assert!(!vendor_heads.is_empty());
    Ok(())
}
