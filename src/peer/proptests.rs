//! Property tests of what a peer can send: the frame decoder ([`decode`], [`Channel`]) and
//! every [`Message`]. Arbitrary bytes, arbitrary JSON and mutated valid frames never panic;
//! valid messages round-trip, alone and through a channel; unknown fields are ignored (a newer
//! peer may add some) and unknown message types refused, unknown error kinds read as
//! [`ErrorKind::Other`]. `PROPTEST_CASES=N` sets how many inputs each property tries.

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::pki::Security;
use crate::ports::PortRange;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9._/-]{0,12}",
        1 => any::<String>(),
    ]
}

fn port_range() -> impl Strategy<Value = PortRange> {
    (1u16..=u16::MAX)
        .prop_flat_map(|first| (Just(first), first..=u16::MAX))
        .prop_map(|(first, last)| PortRange { first, last })
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    proptest::sample::select(vec![
        ErrorKind::MixedSecurity,
        ErrorKind::Unsecured,
        ErrorKind::PkiBroken,
        ErrorKind::PlainRefused,
        ErrorKind::CredentialsUnusable,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::DestinationNotIncoming,
        ErrorKind::SourceNotReady,
        ErrorKind::UnknownDisk,
        ErrorKind::DestinationDisk,
        ErrorKind::DiskLeftBehind,
        ErrorKind::MirrorFailed,
        ErrorKind::Ports,
        ErrorKind::TlsHandshake,
        ErrorKind::MigrationFailed,
        ErrorKind::DestinationDied,
        ErrorKind::Stalled,
        ErrorKind::QemuGone,
        ErrorKind::Qmp,
        ErrorKind::Cancelled,
        ErrorKind::SplitBrainRisk,
        ErrorKind::Usage,
        ErrorKind::BadRequest,
        ErrorKind::Busy,
        ErrorKind::Protocol,
        ErrorKind::ProtocolVersion,
        ErrorKind::NotAllowed,
        ErrorKind::Channel,
        ErrorKind::Credentials,
        ErrorKind::Listen,
        ErrorKind::NoSuchDomain,
        ErrorKind::DomainNotMovable,
        ErrorKind::DomainExists,
        ErrorKind::Libvirt,
        ErrorKind::BackingMismatch,
        ErrorKind::MachineType,
        ErrorKind::Other,
    ])
}

fn security() -> impl Strategy<Value = Security> {
    prop_oneof![
        Just(Security::Secured),
        text().prop_map(|reason| Security::Unsecured { reason }),
        proptest::collection::vec(text(), 0..3).prop_map(|problems| Security::Broken { problems }),
    ]
}

fn backing() -> impl Strategy<Value = BackingSpec> {
    (text(), text(), any::<u64>(), proptest::option::of(text())).prop_map(
        |(filename, format, size, fingerprint)| BackingSpec {
            filename,
            format,
            size,
            fingerprint,
        },
    )
}

fn disk() -> impl Strategy<Value = DiskSpec> {
    (
        text(),
        proptest::option::of(text()),
        any::<u64>(),
        prop_oneof![Just(DiskCopy::Full), Just(DiskCopy::Top)],
        proptest::option::of(backing()),
    )
        .prop_map(|(node, device, size, copy, backing)| DiskSpec {
            node,
            device,
            size,
            copy,
            backing,
        })
}

fn authz() -> impl Strategy<Value = Authz> {
    prop_oneof![
        Just(Authz::Off),
        Just(Authz::FromPeerCert),
        text().prop_map(Authz::Identity),
    ]
}

fn plan() -> impl Strategy<Value = DestPlan> {
    (
        (
            any::<bool>(),
            proptest::option::of(text()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(prop_oneof![
                Just(crate::qemu::Compression::Zstd),
                Just(crate::qemu::Compression::Zlib),
            ]),
        ),
        (
            proptest::collection::vec(disk(), 0..3),
            any::<bool>(),
            authz(),
            text(),
            port_range(),
        ),
    )
        .prop_map(
            |(
                (tls, tls_priority, multifd, multifd_compression),
                (disks, create_dest_disks, authz, listen_address, port_range),
            )| DestPlan {
                tls,
                tls_priority,
                multifd,
                multifd_compression,
                disks,
                create_dest_disks,
                authz,
                listen_address,
                port_range,
                machine: None,
                postcopy: false,
            },
        )
}

fn new_disk() -> impl Strategy<Value = NewDisk> {
    (
        text(),
        text(),
        any::<u64>(),
        proptest::option::of(
            (text(), text()).prop_map(|(file_name, format)| NewBacking { file_name, format }),
        ),
        any::<(bool, bool)>(),
    )
        .prop_map(|(target, format, size, backing, (adopt, grow))| NewDisk {
            target,
            format,
            size,
            backing,
            adopt,
            grow,
        })
}

/// Any message of the protocol, every variant.
pub(super) fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        text().prop_map(|client| Message::Hello { client }),
        (text(), security(), any::<u32>()).prop_map(|(server, security, cpus)| {
            Message::Welcome {
                server,
                security,
                cpus,
            }
        }),
        (text(), proptest::collection::vec(new_disk(), 0..3))
            .prop_map(|(xml, disks)| Message::StartDomain { xml, disks }),
        text().prop_map(|qmp| Message::DomainStarted { qmp }),
        (text(), plan()).prop_map(|(qmp, plan)| Message::Preflight { qmp, plan }),
        (
            any::<bool>(),
            proptest::option::of((0u32..20, 0u32..10, 0u32..30))
        )
            .prop_map(|(backing_checked, qemu)| Message::Preflighted {
                backing_checked,
                qemu: qemu.map(|(a, b, c)| crate::qmp::QemuVersion::new(a, b, c)),
            }),
        Just(Message::Prepare),
        (any::<u16>(), proptest::option::of(any::<u16>())).prop_map(
            |(migration_port, nbd_port)| Message::Prepared {
                prepared: DestPrepared {
                    migration_port,
                    nbd_port,
                },
            }
        ),
        any::<bool>().prop_map(|resume| Message::Finish { resume }),
        (
            proptest::collection::vec(text(), 0..3),
            proptest::option::of(any::<i64>())
        )
            .prop_map(|(problems, resumed_at_us)| Message::Finished {
                problems,
                resumed_at_us,
            }),
        Just(Message::Abort),
        (any::<bool>(), proptest::collection::vec(text(), 0..3))
            .prop_map(|(stopped, problems)| Message::Aborted { stopped, problems }),
        text().prop_map(|reason| Message::Gone { reason }),
        (error_kind(), text(), any::<bool>()).prop_map(|(kind, message, refusal)| {
            Message::Error {
                kind,
                message,
                refusal,
            }
        }),
        Just(Message::Ping),
        Just(Message::Pong),
    ]
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::from),
        proptest::sample::select(vec![
            "ping",
            "hello",
            "preflight",
            "error",
            "finish",
            "full",
            "top",
            "off",
            "identity",
            "secured",
            "1-2",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    3 => proptest::sample::select(vec![
                        "type", "v", "msg", "kind", "plan", "disks", "node", "size", "copy",
                        "mode", "dn", "state", "port_range", "qmp", "client", "tls", "authz",
                    ])
                    .prop_map(String::from),
                    1 => text(),
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Anything that decodes must encode again and decode to the same message.
fn decodes_stably(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = decode(bytes) {
        let again = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decode(&again).ok(), Some(msg));
    }
    Ok(())
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, byte, how) in edits {
        let i = at % (bytes.len() + 1);
        match how {
            0 if i < bytes.len() => bytes[i] = byte,
            1 => bytes.insert(i, byte),
            _ if i < bytes.len() => {
                bytes.remove(i);
            }
            _ => {}
        }
    }
    bytes
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A frame on the wire: a valid message, or any payload.
#[derive(Debug, Clone)]
enum Frame {
    Valid(Message),
    Raw(Vec<u8>),
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        3 => message().prop_map(Frame::Valid),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Frame::Raw),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_message_round_trips_through_its_frame(msg in message()) {
        let bytes = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decode(&bytes).ok(), Some(msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_what_decodes_is_stable(
        bytes in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        decodes_stably(&bytes)?;
    }

    #[test]
    fn arbitrary_json_as_a_message_never_panics_and_what_decodes_is_stable(
        msg in json(), v in prop_oneof![Just(VERSION), any::<u32>()]
    ) {
        let env = serde_json::json!({"v": v, "msg": msg});
        let bytes = serde_json::to_vec(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
        decodes_stably(&bytes)?;
        decodes_stably(&serde_json::to_vec(&msg).unwrap_or_default())?;
    }

    #[test]
    fn mutated_frames_never_panic_and_what_decodes_is_stable(
        msg in message(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let bytes = encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        decodes_stably(&mutate(bytes.to_vec(), &edits))?;
    }

    #[test]
    fn unknown_fields_are_ignored_in_every_message_and_envelope(
        msg in message(), name in "[a-z_]{1,12}", extra in json(),
    ) {
        let mut env = serde_json::json!({"v": VERSION, "msg": msg.clone()});
        let known = env["msg"].as_object().is_some_and(|m| m.contains_key(&name));
        prop_assume!(!known && name != "v" && name != "msg");
        env["msg"][&name] = extra.clone();
        env[&name] = extra;
        let bytes = serde_json::to_vec(&env).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decode(&bytes).ok(), Some(msg));
    }

    #[test]
    fn unknown_message_types_are_refused(name in "[a-z-]{1,20}") {
        let known = serde_json::from_value::<Message>(serde_json::json!({"type": name})).is_ok()
            || MESSAGE_TYPES.contains(&name.as_str());
        prop_assume!(!known);
        let bytes = serde_json::to_vec(&serde_json::json!({"v": VERSION, "msg": {"type": name}}))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(matches!(decode(&bytes), Err(PeerError::Frame(_))));
    }

    #[test]
    fn unknown_error_kinds_read_as_other(name in "[a-z-]{1,20}", message in text()) {
        prop_assume!(serde_json::from_value::<ErrorKind>(Value::from(name.clone()))
            .is_ok_and(|k| k == ErrorKind::Other) && name != "other");
        let bytes = serde_json::to_vec(&serde_json::json!({"v": VERSION, "msg": {
            "type": "error", "kind": name, "message": message, "refusal": true,
        }}))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(
            decode(&bytes).ok(),
            Some(Message::Error { kind: ErrorKind::Other, message, refusal: true })
        );
    }

    #[test]
    fn a_channel_reads_valid_frames_in_order_and_stops_at_the_first_bad_one(
        frames in proptest::collection::vec(frame(), 0..8)
    ) {
        let rt = runtime();
        rt.block_on(async {
            let (ours, theirs) = tokio::io::duplex(1 << 20);
            let mut wire = Vec::new();
            for f in &frames {
                let payload = match f {
                    Frame::Valid(m) => encode(m).map_err(|e| TestCaseError::fail(e.to_string()))?.to_vec(),
                    Frame::Raw(b) => b.clone(),
                };
                wire.extend((payload.len() as u32).to_be_bytes());
                wire.extend(payload);
            }
            use tokio::io::AsyncWriteExt;
            let mut theirs = theirs;
            theirs.write_all(&wire).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
            drop(theirs);
            let mut channel = Channel::new(ours);
            for f in &frames {
                let got = channel.recv(Duration::from_secs(5)).await;
                match (f, got) {
                    (Frame::Valid(m), Ok(got)) => prop_assert_eq!(&got, m),
                    (Frame::Valid(m), Err(e)) => prop_assert!(false, "{m:?} refused: {e}"),
                    (Frame::Raw(_), Ok(_)) => {}
                    (Frame::Raw(_), Err(e)) => {
                        prop_assert!(matches!(e, PeerError::Frame(_) | PeerError::Version { .. }), "{e}");
                        return Ok(());
                    }
                }
            }
            prop_assert!(matches!(channel.recv(Duration::from_secs(5)).await, Err(PeerError::Closed)));
            Ok(())
        })?;
    }

    #[test]
    fn a_channel_fed_arbitrary_bytes_never_panics_and_ends(
        bytes in proptest::collection::vec(any::<u8>(), 0..512)
    ) {
        let rt = runtime();
        rt.block_on(async {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            use tokio::io::AsyncWriteExt;
            let mut theirs = theirs;
            theirs.write_all(&bytes).await.map_err(|e| TestCaseError::fail(e.to_string()))?;
            drop(theirs);
            let mut channel = Channel::new(ours);
            // Each frame takes at least its 4-byte length: the stream ends within this many.
            for _ in 0..=bytes.len() / 4 + 1 {
                match channel.recv(Duration::from_secs(5)).await {
                    Ok(_) => continue,
                    Err(PeerError::Silent(_)) => prop_assert!(false, "a closed stream read as silence"),
                    Err(_) => return Ok(()),
                }
            }
            prop_assert!(false, "the channel never ended");
            Ok(())
        })?;
    }
}

/// The `type` of every message, as the wire names them.
const MESSAGE_TYPES: &[&str] = &[
    "hello",
    "welcome",
    "start-domain",
    "domain-started",
    "preflight",
    "preflighted",
    "prepare",
    "prepared",
    "finish",
    "finished",
    "abort",
    "aborted",
    "gone",
    "error",
    "ping",
    "pong",
];
