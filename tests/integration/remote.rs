//! Two hosts: the destination service in one network namespace, the source command in
//! another, joined by a veth pair, so migration and control traffic really cross between them.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use qemu_tls_migrate::peer::{self, ErrorKind, MAX_FRAME, Message};
use qemu_tls_migrate::pki::Security;
use qemu_tls_migrate::vm::DiskFormat;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::fixture::{self, Cli, Lab, Pair, Service, TwoHosts};

/// A source `migrate --to` command line from host `b` to the service, naming `qmp.sock`.
fn migrate_to_args(
    pair: &Pair,
    service: &Service,
    pki: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    fixture::migrate_to_args(pair, &service.addr, pki, "qmp.sock", extra)
}

/// The JSON report of a `migrate --to` run that exited 0 and completed over TLS (its stderr
/// in the message when it did not).
fn completed_over_tls(out: &std::process::Output) -> serde_json::Value {
    let json = fixture::stdout_json(out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(json["status"], "completed");
    assert_eq!(json["transport"], "tls");
    json
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_with_a_local_disk_migrates_over_tls_between_two_hosts() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let mut pair = Pair::builder()
        .on(&hosts)
        .disks(&[("disk0", DiskFormat::Qcow2, 32)])
        .start()
        .await;
    let mut service = Service::builder(&pki_a, &fixture::qmp_dir(&pair.dest))
        .on(&hosts)
        .allow(&["host-b"])
        .start()
        .await;
    let args = migrate_to_args(
        &pair,
        &service,
        &pki_b,
        &["--all-local-disks", "--dest-paused", "--authz"],
    );

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = completed_over_tls(&out);
    assert_eq!(json["disks"][0]["device"], "disk0");
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    fixture::assert_ram_identical(&pair).await;
    assert!(service.is_running());
    assert_eq!(
        service.stop().await,
        Some(0),
        "SIGTERM ends the service cleanly"
    );
    pair.quit_both().await;
    for (src, dst) in pair.disk_images() {
        fixture::images_identical(&src, &dst).expect("disk identical on the other host");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_unlisted_certificates_are_refused_at_the_handshake_and_plain_tcp_gets_nothing()
{
    let hosts = TwoHosts::create();
    let lab = Lab::new("Test CA");
    let other = Lab::new("Another CA");
    let pki_a = lab.host("host-a", &["host-a"]);
    let pair = Pair::builder().on(&hosts).start().await;
    let mut service = Service::builder(&pki_a, &fixture::qmp_dir(&pair.dest))
        .on(&hosts)
        .allow(&["host-b"])
        .start()
        .await;

    let foreign = other.host("host-b", &["host-b"]);
    let unlisted = lab.host("host-c", &["host-c"]);
    for pki in [&foreign, &unlisted] {
        let out = Cli::new(migrate_to_args(&pair, &service, pki, &[]))
            .in_netns(&hosts.b)
            .output()
            .await;
        let json = fixture::stdout_json(&out);
        assert_eq!(out.status.code(), Some(3), "{json}");
        assert_eq!(json["error"]["kind"], "connect", "{json}");
    }

    let mut plain = fixture::connect_in_netns(&hosts.b, &service.addr);
    plain
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(fixture::EVENT_TIMEOUT, plain.read_to_end(&mut got)).await;
    assert!(
        got.is_empty() || got[0] == 0x15,
        "a plain client got more than a TLS alert: {got:?}"
    );

    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(
        fixture::status(&pair.dest).await,
        "inmigrate",
        "the destination was not touched"
    );
    assert!(service.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_rolls_both_sides_back_and_the_service_serves_the_next_migration() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let mut pair = Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let mut service = Service::builder(&pki_a, &qmp_dir).on(&hosts).start().await;
    let args = migrate_to_args(
        &pair,
        &service,
        &pki_b,
        &["--max-bandwidth", "8M", "--stall-timeout", "3"],
    );
    let mut child = Cli::new(&args).in_netns(&hosts.b).spawn();
    let mut progress = BufReader::new(child.stderr.take().expect("stderr")).lines();
    assert!(
        fixture::ram_transferred_beyond(&mut progress, 4 << 20).await,
        "the migration never got going"
    );

    hosts.link(false);
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = progress.next_line().await {} });
    let out = tokio::time::timeout(fixture::EVENT_TIMEOUT, child.wait_with_output())
        .await
        .expect("the source gives up")
        .expect("wait");
    drain.abort();

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["status"], "failed");
    fixture::assert_source_untouched(&pair.source).await;
    assert!(
        pair.dest.wait_exit(fixture::EVENT_TIMEOUT).await,
        "the service tore the destination down on its own"
    );
    assert!(service.is_running(), "the service stays up");

    hosts.link(true);
    let next = pair.next_destination("next").await;
    let args = migrate_to_args(&pair, &service, &pki_b, &[]);
    let args: Vec<String> = args
        .into_iter()
        .map(|a| {
            if a == "qmp.sock" {
                "../next/qmp.sock".into()
            } else {
                a
            }
        })
        .collect();
    let refused = Cli::new(&args).in_netns(&hosts.b).output().await;
    assert_eq!(
        fixture::stdout_json(&refused)["error"]["kind"],
        "bad-request",
        "nothing outside --qmp-dir can be named"
    );
    let next_dir = fixture::qmp_dir(&next);
    drop(service);
    let service = Service::builder(&pki_a, &next_dir).on(&hosts).start().await;
    let out = Cli::new(migrate_to_args(&pair, &service, &pki_b, &[]))
        .in_netns(&hosts.b)
        .output()
        .await;
    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(fixture::status(&next).await, "running");
}

/// A TLS connection to the service from host `b`, framed as the protocol frames.
async fn tls_channel(
    hosts: &TwoHosts,
    service: &Service,
    pki: &std::path::Path,
) -> Framed<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, LengthDelimitedCodec> {
    let tcp = fixture::connect_in_netns(&hosts.b, &service.addr);
    let config = peer::client_config(pki).expect("client config");
    let name = rustls::pki_types::ServerName::try_from("host-a").expect("name");
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS");
    // The reader accepts big frames so that it sees whatever the service sends back.
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(usize::MAX)
        .new_codec();
    Framed::new(tls, codec)
}

async fn reply(
    framed: &mut Framed<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        LengthDelimitedCodec,
    >,
) -> Option<Message> {
    match tokio::time::timeout(fixture::EVENT_TIMEOUT, framed.next()).await {
        Ok(Some(Ok(bytes))) => peer::decode(&bytes).ok(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversized_and_wrong_version_frames_are_refused_and_the_service_keeps_serving() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let qmp_dir = tempfile::tempdir().expect("empty qmp dir");
    let mut service = Service::builder(&pki_a, qmp_dir.path())
        .on(&hosts)
        .start()
        .await;

    let mut c = tls_channel(&hosts, &service, &pki_b).await;
    c.send(Bytes::from_static(b"\x00\x01garbage{{"))
        .await
        .expect("send");
    assert!(matches!(
        reply(&mut c).await,
        Some(Message::Error {
            kind: ErrorKind::Protocol,
            ..
        })
    ));

    let mut c = tls_channel(&hosts, &service, &pki_b).await;
    // Only the length prefix: the service must refuse the frame before reading its body.
    let header = (MAX_FRAME as u32 + 1).to_be_bytes();
    c.get_mut().write_all(&header).await.expect("send");
    c.get_mut().flush().await.expect("flush");
    assert!(matches!(
        reply(&mut c).await,
        Some(Message::Error {
            kind: ErrorKind::Protocol,
            ..
        })
    ));

    let mut c = tls_channel(&hosts, &service, &pki_b).await;
    c.send(Bytes::from_static(br#"{"v": 99, "msg": {"type": "ping"}}"#))
        .await
        .expect("send");
    assert!(matches!(
        reply(&mut c).await,
        Some(Message::Error {
            kind: ErrorKind::ProtocolVersion,
            ..
        })
    ));

    let mut c = tls_channel(&hosts, &service, &pki_b).await;
    c.send(
        peer::encode(&Message::Hello {
            client: "test".into(),
        })
        .expect("encode"),
    )
    .await
    .expect("send");
    assert!(
        matches!(
            reply(&mut c).await,
            Some(Message::Welcome {
                security: Security::Secured,
                ..
            })
        ),
        "still serving"
    );
    assert!(service.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_takes_two_migrations_at_once() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let (first, second) = (
        Pair::builder().on(&hosts).start().await,
        Pair::builder().on(&hosts).start().await,
    );
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    for (name, pair) in [("vm1.sock", &first), ("vm2.sock", &second)] {
        std::os::unix::fs::symlink(pair.dest.qmp_path(), qmp_dir.path().join(name)).expect("link");
    }
    let service = Service::builder(&pki_a, qmp_dir.path())
        .on(&hosts)
        .start()
        .await;
    let args_for = |pair: &Pair, name: &str| -> Vec<String> {
        migrate_to_args(pair, &service, &pki_b, &[])
            .into_iter()
            .map(|a| if a == "qmp.sock" { name.to_string() } else { a })
            .collect()
    };
    let (a1, a2) = (args_for(&first, "vm1.sock"), args_for(&second, "vm2.sock"));

    let (o1, o2) = tokio::join!(
        Cli::new(&a1).in_netns(&hosts.b).output(),
        Cli::new(&a2).in_netns(&hosts.b).output()
    );

    let (j1, j2) = (fixture::stdout_json(&o1), fixture::stdout_json(&o2));
    assert_eq!(
        (o1.status.code(), o2.status.code()),
        (Some(0), Some(0)),
        "{j1}\n{j2}"
    );
    assert_ne!(j1["ports"], j2["ports"]);
    assert_eq!(fixture::status(&first.dest).await, "running");
    assert_eq!(fixture::status(&second.dest).await, "running");
}

/// The identity of the `authz-simple` object the destination's `tls-authz` names, read through
/// its watcher socket as soon as the service has set it (while the migration runs).
async fn destination_authz_identity(dest: &qemu_tls_migrate::vm::Vm) -> String {
    let (identity, _) = fixture::wait_migration_object(dest, "tls-authz", "identity").await;
    identity
        .as_str()
        .expect("the authz object's identity")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_with_many_part_utf8_and_cloudstack_subjects_migrate_through_an_allow_list() {
    let (hosts, lab, pki_a, _) = fixture::two_secured_hosts();
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let service = Service::builder(&pki_a, qmp_dir.path())
        .on(&hosts)
        .allow(&["host-b"])
        .start()
        .await;
    for (i, (what, subject)) in fixture::authz_subjects().into_iter().enumerate() {
        let pki_b = lab.host_with_subject(&format!("host-b-{i}"), &["host-b"], subject);
        let dn = qemu_tls_migrate::pki::certificate_authz_dn(&fixture::client_cert_der(&pki_b))
            .expect("a subject QEMU can match");
        let pair = Pair::builder().on(&hosts).start().await;
        let sock = format!("vm{i}.sock");
        std::os::unix::fs::symlink(pair.dest.qmp_path(), qmp_dir.path().join(&sock)).expect("link");
        let args = fixture::migrate_to_args(
            &pair,
            &service.addr,
            &pki_b,
            &sock,
            &["--max-bandwidth", "32M"],
        );
        let child = Cli::new(&args).in_netns(&hosts.b).spawn();

        let identity = destination_authz_identity(&pair.dest).await;
        let out = tokio::time::timeout(fixture::EVENT_TIMEOUT, child.wait_with_output())
            .await
            .expect("the migration ends")
            .expect("wait");

        let json = fixture::stdout_json(&out);
        assert_eq!(out.status.code(), Some(0), "{what}: {json}");
        assert_eq!(json["transport"], "tls", "{what}");
        assert_eq!(identity, dn, "{what}: the destination's tls-authz identity");
        assert_eq!(fixture::status(&pair.dest).await, "running", "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sources_from_one_address_all_get_in_one_after_another() {
    let lab = Lab::new("Test CA");
    let pki_a = lab.host("host-a", &["host-a"]);
    let pki_b = lab.host("host-b", &["host-b"]);
    let qmp_dir = tempfile::tempdir().expect("qmp dir");
    let service = Service::builder(&pki_a, qmp_dir.path()).start().await;
    let target = qemu_tls_migrate::migration::RemoteTarget {
        address: service.addr.parse().expect("the service's address"),
        server_name: "host-a".into(),
        qmp: "vm.sock".into(),
        pki_dir: pki_b,
    };

    // Four times the per-address limit at once: the refused ones are told busy and retry.
    let connects = (0..4 * qemu_tls_migrate::service::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS)
        .map(|_| qemu_tls_migrate::migration::RemoteDestination::connect(&target));
    let results = futures_util::future::join_all(connects).await;

    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_cloudstack_renewal_the_service_and_the_source_refresh_their_pki_and_migrate() {
    use fixture::cloudstack;
    use qemu_tls_migrate::host::{SecureOptions, plan_secure};
    let hosts = TwoHosts::create();
    let lab = Lab::new("CloudStack CA");
    // host-a serves (the destination), host-b migrates from; each secured by `host secure`.
    let [root_a, root_b] = [("host-a", 0xA1), ("host-b", 0xB1)].map(|(name, serial)| {
        let root = tempfile::tempdir().expect("root");
        cloudstack::provision(root.path(), &lab.ca, &[name], serial);
        plan_secure(&SecureOptions::new(root.path()))
            .and_then(|plan| plan.apply())
            .expect("host secure");
        root
    });
    let (pki_a, pki_b) = (
        cloudstack::qemu_pki_dir(root_a.path()),
        cloudstack::qemu_pki_dir(root_b.path()),
    );
    let (agent_a, agent_b) = (
        cloudstack::agent_dir(root_a.path()),
        cloudstack::agent_dir(root_b.path()),
    );
    let pair = Pair::builder().on(&hosts).start().await;
    let service = Service::builder(&pki_a, &fixture::qmp_dir(&pair.dest))
        .on(&hosts)
        .allow(&["host-b"])
        .args(&["--cloudstack-dir", &agent_a.display().to_string()])
        .start()
        .await;
    // CloudStack renews both while the service runs; no follower runs.
    cloudstack::keystore_cert_import(root_a.path(), &lab.ca, &["host-a"], 0xA2);
    cloudstack::keystore_cert_import(root_b.path(), &lab.ca, &["host-b"], 0xB2);
    let agent_b_arg = agent_b.display().to_string();
    let args = migrate_to_args(
        &pair,
        &service,
        &pki_b,
        &["--cloudstack-dir", &agent_b_arg, "--authz"],
    );

    let out = Cli::new(&args).in_netns(&hosts.b).output().await;

    let json = completed_over_tls(&out);
    let warnings = json["warnings"].to_string();
    assert!(
        warnings.contains("the source's PKI directory") && warnings.contains("was refreshed"),
        "{warnings}"
    );
    for (pki, agent, copy) in [
        (&pki_a, &agent_a, "server-cert.pem"),
        (&pki_b, &agent_b, "client-cert.pem"),
    ] {
        assert_eq!(
            fixture::cert_der(&pki.join(copy)),
            fixture::cert_der(&agent.join("cloud.crt")),
            "{} follows the renewal",
            pki.join(copy).display()
        );
    }
    assert_eq!(fixture::status(&pair.dest).await, "running");
}
