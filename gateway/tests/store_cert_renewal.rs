//! Which certificate of an appliance is current and which renewed one waits (migration 0011),
//! on both backends, through the same path the relay takes (`cert_renewal::appliance_for_cert`).

use gateway::{
    cert_renewal::appliance_for_cert,
    store::{ApplianceRow, Store},
};
use jiff::Timestamp;
use postern::pg_cluster;
use rustls_pki_types::{pem::PemObject, CertificateDer};
use std::time::Duration;

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("pem")
        .to_vec()
}

async fn pending_becomes_current_at_first_use(store: Store) {
    let now = gateway::store::now();
    store
        .insert_appliance(&ApplianceRow {
            id: "ap_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            created_at: now,
            created_by: "admin".into(),
            cert_fingerprint: None,
            enrolled_at: None,
            revoked_at: None,
            last_seen: None,
            agent_version: None,
            resources: "[]".into(),
        })
        .await
        .expect("insert");
    let ca = certs::Ca::generate("t", Timestamp::now()).expect("ca");
    let issue = || {
        let (_, csr) = certs::generate_key_and_csr("ap_1").expect("csr");
        ca.sign_agent_csr(&csr, "ap_1", Timestamp::now(), Duration::from_secs(600))
            .expect("sign")
    };
    let (old, new) = (issue(), issue());
    let (fp_old, fp_new) = (
        certs::fingerprint_pem(&old).expect("fp"),
        certs::fingerprint_pem(&new).expect("fp"),
    );
    store
        .set_enrolled("ap_1", &fp_old, now)
        .await
        .expect("enroll");
    gateway::cert_renewal::enrolled(&store, "ap_1", &old).await;
    assert!(store
        .set_pending_cert("ap_1", &fp_new, &new, now)
        .await
        .expect("pending"));
    assert_eq!(
        store
            .pending_cert_pem("ap_1")
            .await
            .expect("pem")
            .as_deref(),
        Some(new.as_str())
    );
    // Both open the appliance until the new one is used; then only the new one.
    assert!(appliance_for_cert(&store, &der(&old))
        .await
        .expect("old")
        .is_some());
    let a = appliance_for_cert(&store, &der(&new)).await.expect("new");
    assert_eq!(a.and_then(|a| a.cert_fingerprint), Some(fp_new.clone()));
    assert!(appliance_for_cert(&store, &der(&old))
        .await
        .expect("old")
        .is_none());
    assert!(store.pending_cert_pem("ap_1").await.expect("pem").is_none());
    let not_after = certs::CertInfo::from_pem(&new).expect("info").not_after;
    assert_eq!(
        store.cert_expiries().await.expect("expiries"),
        vec![("ap_1".to_string(), not_after)]
    );
    // A revoked appliance gets no pending certificate.
    store.revoke_appliance("ap_1", now).await.expect("revoke");
    let third = issue();
    let fp3 = certs::fingerprint_pem(&third).expect("fp");
    assert!(!store
        .set_pending_cert("ap_1", &fp3, &third, now)
        .await
        .expect("pending"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_pending_becomes_current_at_first_use() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite:{}", dir.path().join("postern.db").display());
    pending_becomes_current_at_first_use(Store::open(&url).await.expect("open")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_pending_becomes_current_at_first_use() {
    let cluster = pg_cluster::shared();
    let url = cluster.create_database("pending_becomes_current_at_first_use");
    pending_becomes_current_at_first_use(Store::open(&url).await.expect("open")).await
}
