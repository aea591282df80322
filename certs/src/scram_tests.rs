use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

const NONCE: &[u8] = b"0123456789abcdefgh";

fn verifier(pw: &str) -> Verifier {
    Verifier::from_password(pw, b"saltsaltsaltsalt", DEFAULT_ITERATIONS)
}

/// Runs a real client (postgres-protocol's, as tokio-postgres uses) against our server.
fn exchange(
    stored: &str,
    client_pw: &str,
    binding: ChannelBinding,
    mechanism: &str,
    end_point: Option<Vec<u8>>,
) -> Result<(), String> {
    let mut server = ScramServer::new(verifier(stored), NONCE, end_point);
    let mut client = ScramSha256::new(client_pw.as_bytes(), binding);
    let first = server
        .client_first(mechanism, client.message())
        .map_err(|e| e.to_string())?;
    client
        .update(first.as_bytes())
        .map_err(|e| format!("client update: {e}"))?;
    let last = server
        .client_final(client.message())
        .map_err(|e| e.to_string())?;
    client
        .finish(last.as_bytes())
        .map_err(|e| format!("client finish: {e}"))
}

#[test]
fn exchanges_with_a_real_client() {
    let cert_hash = vec![7u8; 32];
    type Case = (
        &'static str,
        &'static str,
        ChannelBinding,
        &'static str,
        Option<Vec<u8>>,
        Result<(), String>,
    );
    let cases: Vec<Case> = vec![
        (
            "right password, no binding",
            "pw",
            ChannelBinding::unsupported(),
            MECHANISM,
            None,
            Ok(()),
        ),
        (
            "right password, client could bind",
            "pw",
            ChannelBinding::unrequested(),
            MECHANISM,
            None,
            Ok(()),
        ),
        (
            "wrong password",
            "nope",
            ChannelBinding::unsupported(),
            MECHANISM,
            None,
            Err("password authentication failed".into()),
        ),
        (
            "tls-server-end-point binding",
            "pw",
            ChannelBinding::tls_server_end_point(cert_hash.clone()),
            MECHANISM_PLUS,
            Some(cert_hash.clone()),
            Ok(()),
        ),
        (
            "binding to another certificate (a man in the middle)",
            "pw",
            ChannelBinding::tls_server_end_point(vec![8u8; 32]),
            MECHANISM_PLUS,
            Some(cert_hash.clone()),
            Err("SCRAM channel binding: channel binding data does not match".into()),
        ),
        (
            "PLUS stripped by someone in between",
            "pw",
            ChannelBinding::unrequested(),
            MECHANISM,
            Some(cert_hash.clone()),
            Err("SCRAM channel binding: the client was told the server cannot bind".into()),
        ),
        (
            "PLUS not offered",
            "pw",
            ChannelBinding::tls_server_end_point(cert_hash.clone()),
            MECHANISM_PLUS,
            None,
            Err("malformed SCRAM message: unsupported SASL mechanism".into()),
        ),
    ];
    for (name, pw, binding, mech, end_point, want) in cases {
        assert_eq!(exchange("pw", pw, binding, mech, end_point), want, "{name}");
    }
}

#[test]
fn verifier_round_trips_and_matches_postgres() {
    let v = verifier("pw");
    let s = v.to_string();
    assert!(s.starts_with("SCRAM-SHA-256$4096:"), "{s}");
    assert_eq!(Verifier::parse(&s).unwrap(), v);
    assert!(v.matches("pw"));
    assert!(!v.matches("pW"));
    assert!(!format!("{v:?}").contains(&s[20..]));
    let g = Verifier::generate("pw").unwrap();
    assert!(g.matches("pw"));
    assert_ne!(Verifier::generate("pw").unwrap(), g, "salts are random");
}

#[test]
fn malformed_verifiers_are_refused() {
    for bad in [
        "",
        "md5abc",
        "SCRAM-SHA-256$0:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "SCRAM-SHA-256$99999999:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "SCRAM-SHA-256$4096:$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        assert_eq!(Verifier::parse(bad), Err(ScramError::BadVerifier), "{bad:?}");
    }
}

#[test]
fn protocol_violations_are_errors_not_panics() {
    let first_cases: Vec<(&str, &[u8])> = vec![
        ("empty", b""),
        ("not utf8", b"\xff\xfe"),
        ("no header", b"n"),
        ("authzid", b"n,a=admin,n=,r=abc"),
        ("bad flag", b"x,,n=,r=abc"),
        ("extension", b"n,,m=ext,n=,r=abc"),
        ("no nonce", b"n,,n="),
        ("comma nonce", b"n,,n=,r="),
        ("unoffered binding", b"p=tls-unique,,n=,r=abc"),
    ];
    for (name, msg) in first_cases {
        let mut s = ScramServer::new(verifier("pw"), NONCE, None);
        assert!(s.client_first(MECHANISM, msg).is_err(), "{name}");
        assert!(
            s.client_final(b"c=biws,r=x,p=AAAA").is_err(),
            "{name}: no second chance"
        );
    }
    let final_cases: Vec<(&str, String)> = vec![
        ("no proof", "c=biws,r=abc0123".into()),
        ("wrong binding", "c=eSws,r=abcMDEy,p=AAAA".into()),
        (
            "wrong nonce",
            "c=biws,r=other,p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        ),
        (
            "short proof",
            format!("c=biws,r=abc{},p=AAAA", B64.encode(NONCE)),
        ),
        (
            "bad proof",
            format!(
                "c=biws,r=abc{},p=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                B64.encode(NONCE)
            ),
        ),
    ];
    for (name, msg) in final_cases {
        let mut s = ScramServer::new(verifier("pw"), NONCE, None);
        s.client_first(MECHANISM, b"n,,n=,r=abc").unwrap();
        assert!(s.client_final(msg.as_bytes()).is_err(), "{name}");
    }
    let mut s = ScramServer::new(verifier("pw"), NONCE, None);
    assert!(s.client_final(b"c=biws").is_err(), "final before first");
}

#[test]
fn end_point_hash_of_an_ecdsa_certificate() {
    let ca = crate::Ca::generate("test", jiff::Timestamp::now()).unwrap();
    let der = ca.cert_der();
    assert_eq!(
        tls_server_end_point(&der).unwrap(),
        digest::digest(&digest::SHA256, &der).as_ref()
    );
    assert_eq!(tls_server_end_point(b"junk"), None);
}

proptest::proptest! {
    /// Arbitrary bytes as either SCRAM message never panic, and never authenticate.
    #[test]
    fn arbitrary_messages_never_panic(first in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80),
                                      last in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120),
                                      plus in proptest::prelude::any::<bool>()) {
        let mut s = ScramServer::new(verifier("pw"), NONCE, Some(vec![1; 32]));
        let _ = s.client_first(if plus { MECHANISM_PLUS } else { MECHANISM }, &first);
        proptest::prop_assert!(s.client_final(&last).is_err());
    }
}
