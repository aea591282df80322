//! kubectl endpoint credentials: the operator's CSR signed for the endpoint's lifetime.

use jiff::{SignedDuration, Timestamp};
use rustls_pki_types::{pem::PemObject, CertificateDer};

#[test]
fn signed_client_csr_keeps_the_operators_key_and_dies_with_the_endpoint() {
    let now = Timestamp::now();
    let ca = certs::Ca::generate("test", now).unwrap();
    let (_key, csr) = certs::generate_key_and_csr("operator").unwrap();
    let until = now + SignedDuration::from_secs(600);
    let pem = ca
        .sign_client_csr(&csr, "postern:endpoint:ep_1", now, until)
        .unwrap();
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    assert_eq!(
        certs::cert_spki(&der).unwrap(),
        certs::csr_spki(&csr).unwrap()
    );
    assert_eq!(
        certs::verified_csr_spki(&csr).unwrap(),
        certs::csr_spki(&csr).unwrap()
    );
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.validity().not_after.timestamp(), until.as_second());
    // The tcp front end names the endpoint a foreign certificate was made for.
    assert_eq!(
        certs::cert_common_name(&der).unwrap(),
        "postern:endpoint:ep_1"
    );
    assert!(certs::cert_common_name(b"garbage").is_err());

    // An endpoint that already ended gets no certificate; garbage is no CSR.
    assert!(ca
        .sign_client_csr(&csr, "x", now, now - SignedDuration::from_secs(600))
        .is_err());
    assert!(ca.sign_client_csr("not a csr", "x", now, until).is_err());
    // Flip one base64 character inside the body (the signature or the signed data).
    let mut lines: Vec<String> = csr.lines().map(str::to_string).collect();
    let line = &mut lines[2];
    let c = if line.as_bytes()[10] == b'A' {
        "B"
    } else {
        "A"
    };
    line.replace_range(10..11, c);
    let tampered = lines.join("\n");
    assert_ne!(tampered.trim(), csr.trim());
    assert!(certs::verified_csr_spki(&tampered).is_err());
}
