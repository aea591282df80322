use super::codec::LEN_PREFIX;
use super::*;
use crate::{
    api::{EnrollRequest, EnrollResponse},
    control::{GrantLevel, OpTool},
    error::{ApiError, ErrorCode},
    resource::{
        ApprovalMode, CloseReason, EndpointType, PolicySummary, ResourceDescriptor, ResourceKind,
    },
    secret::Secret,
    ssh_scope::SshTeardown,
};
use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use std::collections::BTreeSet;

fn hello() -> Hello {
    Hello {
        protocol_version: 1,
        agent_version: "0.1.0".into(),
        resources: vec![ResourceDescriptor {
            id: "null_resource.echo".into(),
            kind: ResourceKind::Tcp,
            scope: None,
        }],
        policy: PolicySummary {
            approval: ApprovalMode::Automatic,
            steady_state: true,
            ..Default::default()
        },
        trail_number: Some(3),
        trail_heads: true,
        steady_state: false,
    }
}

fn at(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

fn grant() -> EndpointGrant {
    EndpointGrant {
        phase: crate::phase::operate(),
        endpoint_id: "ep_1".into(),
        endpoint_type: EndpointType::Tcp,
        resource_id: "null_resource.echo".into(),
        expires_at: at("2030-01-01T00:00:00Z"),
        grant_id: Some("gr_1".into()),
        signed_decision: None,
    }
}

fn live_grant() -> LiveGrant {
    LiveGrant {
        grant_id: "gr_1".into(),
        level: GrantLevel::Operate,
        approved_by: "alice@customer".into(),
        approved_at: at("2029-12-31T00:00:00Z"),
        expires_at: at("2030-01-01T00:00:00Z"),
        signed_decision: None,
    }
}

fn dispatch() -> OpDispatch {
    OpDispatch {
        phase: crate::phase::operate(),
        op_id: "op_1".into(),
        tool: OpTool::Kubectl,
        command: "kubectl get pods".into(),
        resource_id: "aws_eks_cluster.main".into(),
        timeout_s: 60,
        operator: "bob@vendor".into(),
        grant_id: "gr_1".into(),
        command_approved_by: "policy:automatic".into(),
        command_approved_at: at("2029-12-31T01:00:00Z"),
        hold_output: true,
        signed_decision: None,
    }
}

fn refusal() -> ApiError {
    ApiError::new(ErrorCode::OperateAccessRequired, "no live operate grant")
}

/// One of every command.
fn commands() -> Vec<AgentCommand> {
    vec![
        AgentCommand::EndpointSync {
            endpoints: vec![grant()],
        },
        AgentCommand::EndpointOpen(grant()),
        AgentCommand::EndpointClose {
            endpoint_id: "ep_1".into(),
            reason: CloseReason::Retired,
        },
        AgentCommand::GrantSync {
            grants: vec![live_grant()],
        },
        AgentCommand::OpDispatch(dispatch()),
        AgentCommand::OutputRelease {
            op_id: "op_1".into(),
            approved_by: "alice@customer".into(),
            signed_decision: None,
        },
        AgentCommand::OutputDestroy {
            op_id: "op_1".into(),
            denied_by: "alice@customer".into(),
            message: Some("not today".into()),
        },
        AgentCommand::TrailRecords {
            records: vec![trail_record()],
            lost_through: Some(6),
        },
    ]
}

fn trail_record() -> crate::customer_trail::GatewayRecord {
    crate::customer_trail::GatewayRecord {
        number: 7,
        event: crate::customer_trail::GatewayEvent::OpDenied,
        time: at("2026-01-02T03:04:05Z"),
        actor: "bob@customer".into(),
        endpoint_id: None,
        op_id: Some("op_1".into()),
        detail: serde_json::json!({"stage": "command", "message": "not now"}),
        gateway_seq: 41,
        gateway_hash: "ab".repeat(32),
    }
}

/// One of every gateway → agent control frame.
fn to_agent() -> Vec<ToAgent> {
    let mut frames = vec![
        ToAgent::Heartbeat { seq: 1 },
        ToAgent::HeartbeatAck { seq: 2 },
        ToAgent::OutputFetch {
            op_id: "op_1".into(),
        },
        ToAgent::Error(refusal()),
        ToAgent::Command {
            seq: 3,
            command: AgentCommand::GrantSync { grants: vec![] },
        },
        ToAgent::TeardownAck {
            endpoint_id: "ep_1".into(),
            refused: None,
        },
        ToAgent::TeardownAck {
            endpoint_id: "ep_2".into(),
            refused: Some(refusal()),
        },
    ];
    frames.extend(commands().into_iter().map(ToAgent::from));
    frames.push(ToAgent::TrailHead(head(
        crate::trail_head::TrailSide::Gateway,
    )));
    frames.push(ToAgent::CertRenewal(crate::cert_renewal::CertRenewAnswer {
        request_id: 1,
        cert_pem: Some("-----BEGIN CERTIFICATE-----".into()),
        refused: None,
    }));
    frames.push(ToAgent::CertRenewal(crate::cert_renewal::CertRenewAnswer {
        request_id: 2,
        cert_pem: None,
        refused: Some(refusal()),
    }));
    frames
}

fn head(trail: crate::trail_head::TrailSide) -> crate::trail_head::SignedHead {
    crate::trail_head::SignedHead {
        trail,
        appliance_id: Some("ap_1".into()),
        seq: 101,
        prev_hash: "ab".repeat(32),
        time: jiff::Timestamp::from_second(1_700_000_000).unwrap(),
        signature: "MEUC".into(),
        key: "BAAA".into(),
    }
}

/// One of every agent → gateway control frame.
fn to_gateway() -> Vec<ToGateway> {
    vec![
        ToGateway::TrailHead(head(crate::trail_head::TrailSide::Appliance)),
        ToGateway::ApprovalRefused {
            record_id: "gr_1".into(),
            error: crate::approval::ApprovalInvalid::Missing.to_api_error(),
        },
        ToGateway::CertRenew(crate::cert_renewal::CertRenewRequest {
            request_id: 1,
            csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        }),
        ToGateway::Heartbeat { seq: 1 },
        ToGateway::HeartbeatAck { seq: 2 },
        ToGateway::CommandAck { seq: 3 },
        ToGateway::OpRefused {
            op_id: "op_1".into(),
            error: refusal(),
        },
        ToGateway::OpStarted {
            op_id: "op_1".into(),
        },
        ToGateway::OpOutput {
            op_id: "op_1".into(),
            stream: OutputStream::Stderr,
            data: "error: no pods\n".into(),
            preview: false,
        },
        ToGateway::OpFinished(OpFinished {
            op_id: "op_1".into(),
            held: false,
            exit_code: Some(1),
            truncated: false,
            timed_out: false,
            error: Some(ApiError::new(ErrorCode::CommandFailed, "exit 1")),
            preview: false,
            destroyed: false,
        }),
        ToGateway::OpRecord {
            op_id: "op_1".into(),
            kind: "kube.request".into(),
            detail: serde_json::json!({"verb": "list", "resource": "pods"}),
        },
        ToGateway::SshTeardown(SshTeardown {
            endpoint_id: "ep_1".into(),
            resource_id: "aws_instance.worker".into(),
            user: "vendor".into(),
            reason: CloseReason::Expired,
            killed: vec![],
            crontab: vec!["* * * * * true".into()],
            at_jobs: vec![],
            units: vec![],
            other_output: vec![],
            exit_status: Some(0),
            skipped: None,
            error: None,
            truncated: false,
        }),
        ToGateway::Error(refusal()),
        ToGateway::TrailRecorded { number: 7 },
        ToGateway::TeardownProof(crate::teardown::SignedTeardown {
            proof: crate::teardown::TeardownProof {
                endpoint_id: "ep_1".into(),
                appliance_id: "ap_1".into(),
                endpoint_type: crate::resource::EndpointType::Postgres,
                resource_id: "aws_db_instance.main".into(),
                reason: CloseReason::Retired,
                ended_at: at("2026-01-01T00:00:00Z"),
                proved_at: at("2026-01-01T00:00:01Z"),
                offline: true,
                checks: vec![crate::teardown::TeardownCheck {
                    name: "pg_role_gone".into(),
                    passed: true,
                    took_ms: 4,
                    detail: "0 row(s) in pg_roles".into(),
                }],
            },
            signature: "MEUCIQ==".into(),
        }),
    ]
}

/// An agent that keeps no gateway records says nothing about them in its hello, and an old
/// gateway reads a new agent's hello.
#[test]
fn a_hello_without_a_trail_number_is_an_agent_that_keeps_none() {
    let mut old = serde_json::to_value(Handshake::Hello(hello())).unwrap();
    old.as_object_mut().unwrap().remove("trail_number");
    let Handshake::Hello(h) = serde_json::from_value(old).unwrap();
    assert_eq!(h.trail_number, None);
    let new = serde_json::to_value(Handshake::Hello(hello())).unwrap();
    assert_eq!(new["trail_number"], 3);
}

fn handshake() -> Vec<Handshake> {
    vec![Handshake::Hello(hello())]
}

fn handshake_answer() -> Vec<HandshakeAnswer> {
    vec![
        HandshakeAnswer::HelloAck(HelloAck {
            appliance_id: "ap_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            heartbeat_interval_ms: 5_000,
            lost_after_ms: 15_000,
            audit_key: Some("BAAA".into()),
            approval_refusals: true,
            cert_renewal: true,
        }),
        HandshakeAnswer::Error(ApiError::new(ErrorCode::ApplianceRevoked, "revoked")),
    ]
}

fn stream_header() -> Vec<StreamHeader> {
    vec![StreamHeader::StreamOpen(StreamOpen {
        endpoint_id: "ep_1".into(),
        session_id: "ses_1".into(),
        resource_id: "null_resource.echo".into(),
        operator: "bob@vendor".into(),
        client_addr: "192.0.2.7:50000".into(),
    })]
}

fn stream_answer() -> Vec<StreamAnswer> {
    vec![
        StreamAnswer::StreamAccept,
        StreamAnswer::StreamRefuse(ApiError::new(ErrorCode::EndpointRetired, "retired")),
    ]
}

fn enrollment() -> Vec<Enrollment> {
    vec![Enrollment::EnrollRequest(EnrollRequest {
        token: Secret::new("pse1_token"),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        agent_version: "0.1.0".into(),
    })]
}

fn enrollment_answer() -> Vec<EnrollmentAnswer> {
    vec![
        EnrollmentAnswer::EnrollResponse(EnrollResponse {
            appliance_id: "ap_1".into(),
            app: "shop".into(),
            customer: "acme".into(),
            cert_pem: "cert".into(),
            ca_pem: "ca".into(),
            audit_key: None,
        }),
        EnrollmentAnswer::Error(ApiError::new(ErrorCode::Unauthenticated, "bad token")),
    ]
}

/// Every sample frame of every type, encoded, with its wire name.
fn every_encoded_frame() -> Vec<(&'static str, Vec<u8>)> {
    fn encoded<F: WireFrame>(frames: Vec<F>) -> Vec<(&'static str, Vec<u8>)> {
        frames
            .iter()
            .map(|f| (f.wire_name(), encode_to_vec(f)))
            .collect()
    }
    [
        encoded(handshake()),
        encoded(handshake_answer()),
        encoded(to_agent()),
        encoded(to_gateway()),
        encoded(stream_header()),
        encoded(stream_answer()),
        encoded(enrollment()),
        encoded(enrollment_answer()),
    ]
    .concat()
}

/// Each frame encodes, decodes back to itself (several in one buffer, raw bytes after them
/// left alone), and its `name` is its wire `type`.
fn assert_round_trip<F: WireFrame + PartialEq + std::fmt::Debug>(frames: Vec<F>) {
    let mut buf = BytesMut::new();
    for f in &frames {
        assert_eq!(
            serde_json::to_value(f).unwrap()["type"],
            f.wire_name(),
            "{f:?}"
        );
        encode(f, &mut buf);
    }
    buf.extend_from_slice(b"raw tail");
    let dec = FrameDecoder::default();
    for f in &frames {
        assert_eq!(dec.decode::<F>(&mut buf).unwrap().as_ref(), Some(f));
    }
    assert_eq!(&buf[..], b"raw tail");
}

#[test]
fn handshake_frames_round_trip() {
    assert_round_trip(handshake());
    assert_round_trip(handshake_answer());
}

#[test]
fn to_agent_frames_round_trip() {
    assert_round_trip(to_agent());
}

#[test]
fn to_gateway_frames_round_trip() {
    assert_round_trip(to_gateway());
}

#[test]
fn stream_frames_round_trip() {
    assert_round_trip(stream_header());
    assert_round_trip(stream_answer());
}

#[test]
fn enrollment_frames_round_trip() {
    assert_round_trip(enrollment());
    assert_round_trip(enrollment_answer());
}

/// A decoder for one type takes exactly the frames whose wire name that type has, and refuses
/// every other frame of the protocol as malformed (no panic, and the frame is consumed).
#[test]
fn each_type_refuses_the_frames_of_other_streams_and_directions() {
    fn accepted_names<F: WireFrame>(samples: Vec<F>) -> BTreeSet<&'static str> {
        samples.iter().map(WireFrame::wire_name).collect()
    }
    fn check<F: WireFrame>(own: BTreeSet<&'static str>) {
        let dec = FrameDecoder::default();
        for (name, bytes) in every_encoded_frame() {
            let mut buf = BytesMut::from(&bytes[..]);
            let got = dec.decode::<F>(&mut buf);
            if own.contains(name) {
                assert_eq!(got.unwrap().map(|f| f.wire_name()), Some(name));
            } else {
                assert!(
                    matches!(got, Err(FrameError::Malformed(_))),
                    "{name} decoded as {}",
                    std::any::type_name::<F>()
                );
            }
            assert!(buf.is_empty(), "{name}: the frame is consumed either way");
        }
    }
    check::<Handshake>(accepted_names(handshake()));
    check::<HandshakeAnswer>(accepted_names(handshake_answer()));
    check::<ToAgent>(accepted_names(to_agent()));
    check::<ToGateway>(accepted_names(to_gateway()));
    check::<StreamHeader>(accepted_names(stream_header()));
    check::<StreamAnswer>(accepted_names(stream_answer()));
    check::<Enrollment>(accepted_names(enrollment()));
    check::<EnrollmentAnswer>(accepted_names(enrollment_answer()));
}

#[test]
fn frames_of_the_other_direction_are_refused_on_the_control_stream() {
    let dec = FrameDecoder::default();
    // What the agent reports is not something the agent can be told, and the reverse.
    let started = encode_to_vec(&ToGateway::OpStarted {
        op_id: "op_1".into(),
    });
    let err = dec
        .decode::<ToAgent>(&mut BytesMut::from(&started[..]))
        .unwrap_err();
    assert!(
        matches!(&err, FrameError::Malformed(m) if m.contains("op_started")),
        "{err}"
    );
    assert_eq!(err.to_api_error().code, ErrorCode::MalformedFrame);
    let dispatch = encode_to_vec(&ToAgent::OpDispatch(dispatch()));
    assert!(matches!(
        dec.decode::<ToGateway>(&mut BytesMut::from(&dispatch[..])),
        Err(FrameError::Malformed(_))
    ));
    // A second hello, or a hello answer, is not a control frame.
    let hello = encode_to_vec(&Handshake::Hello(hello()));
    assert!(matches!(
        dec.decode::<ToGateway>(&mut BytesMut::from(&hello[..])),
        Err(FrameError::Malformed(_))
    ));
    let ack = encode_to_vec(&handshake_answer()[0]);
    assert!(matches!(
        dec.decode::<ToAgent>(&mut BytesMut::from(&ack[..])),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn heartbeats_and_errors_mean_the_same_both_ways() {
    let dec = FrameDecoder::default();
    let hb = encode_to_vec(&ToGateway::Heartbeat { seq: 9 });
    assert_eq!(
        dec.decode::<ToAgent>(&mut BytesMut::from(&hb[..])).unwrap(),
        Some(ToAgent::Heartbeat { seq: 9 })
    );
    let err = encode_to_vec(&ToAgent::Error(refusal()));
    assert_eq!(
        dec.decode::<ToGateway>(&mut BytesMut::from(&err[..]))
            .unwrap(),
        Some(ToGateway::Error(refusal()))
    );
}

#[test]
fn a_command_carries_its_sequence_number_and_the_frame_it_wraps() {
    let cmd = ToAgent::Command {
        seq: 3,
        command: AgentCommand::EndpointClose {
            endpoint_id: "ep_1".into(),
            reason: CloseReason::Revoked,
        },
    };
    // The wire form the agent and gateway of this tree agree on.
    assert_eq!(
        serde_json::to_value(&cmd).unwrap(),
        serde_json::json!({
            "type": "command",
            "seq": 3,
            "command": {"type": "endpoint_close", "endpoint_id": "ep_1", "reason": "revoked"},
        })
    );
    let mut buf = BytesMut::new();
    encode(&cmd, &mut buf);
    encode(&ToGateway::CommandAck { seq: 3 }, &mut buf);
    let dec = FrameDecoder::default();
    assert_eq!(dec.decode::<ToAgent>(&mut buf).unwrap(), Some(cmd));
    assert_eq!(
        dec.decode::<ToGateway>(&mut buf).unwrap(),
        Some(ToGateway::CommandAck { seq: 3 })
    );
}

#[test]
fn a_command_holds_only_commands() {
    // A command inside a command is not a command: the wire form does not decode.
    let nested = serde_json::json!({
        "type": "command",
        "seq": 4,
        "command": {"type": "command", "seq": 3, "command": {"type": "grant_sync", "grants": []}},
    });
    let json = serde_json::to_vec(&nested).unwrap();
    let mut buf = BytesMut::new();
    buf.put_u32(json.len() as u32 + 1);
    buf.put_u8(FRAME_VERSION);
    buf.extend_from_slice(&json);
    assert!(matches!(
        FrameDecoder::default().decode::<ToAgent>(&mut buf),
        Err(FrameError::Malformed(_))
    ));
    // Nor does a frame that is not a command.
    let fetch = serde_json::json!({
        "type": "command", "seq": 5, "command": {"type": "output_fetch", "op_id": "op_1"},
    });
    assert!(serde_json::from_value::<ToAgent>(fetch).is_err());
}

#[test]
fn commands_convert_to_and_from_their_frames() {
    for command in commands() {
        let frame = ToAgent::from(command.clone());
        assert!(frame.is_command(), "{}", frame.name());
        assert_eq!(frame.name(), command.name());
        // Same wire form whether sent bare or inside a `command`.
        assert_eq!(
            serde_json::to_value(&frame).unwrap(),
            serde_json::to_value(&command).unwrap()
        );
        assert_eq!(AgentCommand::try_from(frame), Ok(command));
    }
    for frame in to_agent() {
        assert_eq!(
            frame.is_command(),
            AgentCommand::try_from(frame.clone()).is_ok(),
            "{}",
            frame.name()
        );
    }
    let fetch = ToAgent::OutputFetch {
        op_id: "op_1".into(),
    };
    assert_eq!(AgentCommand::try_from(fetch.clone()), Err(fetch));
}

#[test]
fn incomplete_is_none_and_byte_at_a_time_works() {
    let frame = Handshake::Hello(hello());
    let bytes = encode_to_vec(&frame);
    let dec = FrameDecoder::default();
    let mut buf = BytesMut::new();
    for (i, b) in bytes.iter().enumerate() {
        assert_eq!(dec.decode::<Handshake>(&mut buf).unwrap(), None);
        assert!(dec.bytes_needed(&buf).unwrap() > 0, "at {i}");
        buf.put_u8(*b);
    }
    assert_eq!(dec.bytes_needed(&buf).unwrap(), 0);
    assert_eq!(dec.decode(&mut buf).unwrap(), Some(frame));
}

#[test]
fn oversized_length_is_refused_before_buffering() {
    let mut buf = BytesMut::new();
    buf.put_u32(u32::MAX);
    let dec = FrameDecoder::new(1024);
    assert_eq!(
        dec.decode::<ToAgent>(&mut buf),
        Err(FrameError::TooLarge {
            len: u32::MAX as usize,
            max: 1024
        })
    );
    assert!(dec.bytes_needed(&buf).is_err());
}

#[test]
fn wrong_version_empty_and_garbage_are_errors() {
    let dec = FrameDecoder::default();
    let mut b = BytesMut::from(&[0u8, 0, 0, 0][..]);
    assert_eq!(dec.decode::<ToGateway>(&mut b), Err(FrameError::Empty));
    let mut b = BytesMut::from(&[0u8, 0, 0, 3, 9, b'{', b'}'][..]);
    assert_eq!(dec.decode::<ToGateway>(&mut b), Err(FrameError::Version(9)));
    let mut b = BytesMut::from(&[0u8, 0, 0, 3, 1, b'{', b'}'][..]);
    assert!(matches!(
        dec.decode::<ToGateway>(&mut b),
        Err(FrameError::Malformed(_))
    ));
    let mut b = BytesMut::from(&[0u8, 0, 0, 1, 1][..]);
    assert!(matches!(
        dec.decode::<ToGateway>(&mut b),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn errors_map_to_codes() {
    assert_eq!(
        FrameError::TooLarge { len: 2, max: 1 }.to_api_error().code,
        ErrorCode::FrameTooLarge
    );
    assert_eq!(
        FrameError::Malformed("x".into()).to_api_error().code,
        ErrorCode::MalformedFrame
    );
}

/// Decodes `data` as frames of type `F` until it runs out or fails; never panics, and never
/// asks for more than prefix + limit.
fn decode_all<F: WireFrame>(data: &[u8], max: usize) -> Result<(), TestCaseError> {
    let dec = FrameDecoder::new(max);
    let mut buf = BytesMut::from(data);
    for _ in 0..data.len() + 1 {
        match dec.decode::<F>(&mut buf) {
            Ok(Some(_)) => continue,
            Ok(None) => {
                let need = dec.bytes_needed(&buf).unwrap();
                prop_assert!(buf.len() + need <= LEN_PREFIX + max);
                break;
            }
            Err(_) => break,
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    // Arbitrary bytes never panic, whatever type is expected.
    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096), max in 1usize..2048) {
        decode_all::<ToAgent>(&data, max)?;
        decode_all::<ToGateway>(&data, max)?;
        decode_all::<Handshake>(&data, max)?;
        decode_all::<StreamAnswer>(&data, max)?;
        decode_all::<EnrollmentAnswer>(&data, max)?;
    }

    // A valid frame of any type with a byte changed, decoded as any type: a frame or an error,
    // never a panic.
    #[test]
    fn mutated_frames_never_panic(which in any::<prop::sample::Index>(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
        let frames = every_encoded_frame();
        let (_, mut bytes) = frames[which.index(frames.len())].clone();
        let i = pos.index(bytes.len());
        bytes[i] = byte;
        let dec = FrameDecoder::default();
        let _ = dec.decode::<ToAgent>(&mut BytesMut::from(&bytes[..]));
        let _ = dec.decode::<ToGateway>(&mut BytesMut::from(&bytes[..]));
        let _ = dec.decode::<HandshakeAnswer>(&mut BytesMut::from(&bytes[..]));
        let _ = dec.decode::<StreamHeader>(&mut BytesMut::from(&bytes[..]));
        let _ = dec.decode::<Enrollment>(&mut BytesMut::from(&bytes[..]));
    }

    #[test]
    fn heartbeat_round_trips(seq in any::<u64>()) {
        let mut buf = BytesMut::new();
        encode(&ToAgent::Heartbeat { seq }, &mut buf);
        encode(&ToGateway::Heartbeat { seq }, &mut buf);
        let dec = FrameDecoder::default();
        prop_assert_eq!(dec.decode::<ToAgent>(&mut buf).unwrap(), Some(ToAgent::Heartbeat { seq }));
        prop_assert_eq!(dec.decode::<ToGateway>(&mut buf).unwrap(), Some(ToGateway::Heartbeat { seq }));
    }
}
