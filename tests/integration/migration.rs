//! Live migration end to end: TLS and TCP, what crosses the wire, RAM integrity, and every
//! failure the core issue lists, each leaving the source running with nothing of ours on it.

use std::time::Duration;

use qemu_tls_migrate::migration::{FinalStatus, Phase, Transport, TransportChoice};
use qemu_tls_migrate::qemu::MigrationStatus;
use qemu_tls_migrate::vm::Accel;
use tokio_util::sync::CancellationToken;

use crate::fixture::{self, DEST_HOST, Lab, Pair, WireTap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_migration_completes_and_guest_ram_is_identical() {
    let lab = Lab::new("Test CA");
    // TCG: under this machine's nested KVM, idle SeaBIOS writes its e-segment page (0xe8000)
    // without KVM's dirty log seeing it, so that one page can differ whatever the tool does
    // (shown by migrating a stopped source: identical). TCG tracks every guest write.
    let pair = Pair::builder()
        .tweak(|c| c.accel = Some(Accel::Tcg))
        .start()
        .await;
    let mut options = pair.tls_options(&lab);
    options.dest_paused = true;

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(report.transport, Some(Transport::Tls));
    assert!(report.ram.bytes >= u64::from(fixture::RAM_MIB / 2) << 20);
    assert_eq!(fixture::status(&pair.source).await, "postmigrate");
    assert_eq!(fixture::status(&pair.dest).await, "paused");
    fixture::assert_ram_identical(&pair).await;
    assert_eq!(
        fixture::tool_objects(&pair.source).await,
        Vec::<String>::new()
    );
    assert_eq!(
        fixture::tool_objects(&pair.dest).await,
        Vec::<String>::new()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_the_wire_then_tcp_onwards_without_stale_settings() {
    let lab = Lab::new("Test CA");
    let (src_pki, dst_pki) = (
        lab.host("src", &["src-host"]),
        lab.host("dst", &[DEST_HOST]),
    );
    let pair = Pair::builder().start().await;
    let tap = WireTap::start(pair.dest.monitor_path().to_path_buf()).await;
    let mut options = pair.options(&src_pki, &dst_pki);
    options.source_connect = Some(tap.addr.parse().expect("tap address"));

    let tls = fixture::migrate(&options).await;

    assert_eq!(tls.status, FinalStatus::Completed, "{:?}", tls.error);
    assert_eq!(fixture::status(&pair.dest).await, "running");
    // A TLS record header: handshake (0x16), version 3.x. A plain stream starts with "QEVM".
    assert_eq!(
        &tap.first_bytes()[..2],
        &[0x16, 0x03],
        "not TLS on the wire"
    );

    // The VM now runs on the first destination; move it on over TCP. The TLS settings of the
    // first migration must not leak into this one.
    let third = pair.next_destination("third").await;
    let tap = WireTap::start(third.monitor_path().to_path_buf()).await;
    let mut onwards = options.clone();
    onwards.source.qmp = pair.dest.qmp_path().to_path_buf();
    onwards.dest.qmp = third.qmp_path().to_path_buf();
    onwards.transport = TransportChoice::Tcp;
    onwards.source_connect = Some(tap.addr.parse().expect("tap address"));

    let tcp = fixture::migrate(&onwards).await;

    assert_eq!(tcp.status, FinalStatus::Completed, "{:?}", tcp.error);
    assert_eq!(tcp.transport, Some(Transport::Tcp));
    assert_eq!(
        &tap.first_bytes()[..4],
        b"QEVM",
        "expected a plain migration stream"
    );
    assert_eq!(fixture::status(&third).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_unsecured_hosts_migrate_over_tcp_with_a_warning() {
    let empty = tempfile::tempdir().expect("empty PKI dir");
    let pair = Pair::builder().start().await;
    let options = pair.options(empty.path(), empty.path());

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(report.transport, Some(Transport::Tcp));
    assert!(
        report.warnings.iter().any(|w| w.contains("plain TCP")),
        "{:?}",
        report.warnings
    );
    assert_eq!(fixture::status(&pair.dest).await, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_pair_is_refused_before_either_vm_is_touched() {
    let lab = Lab::new("Test CA");
    let unsecured = tempfile::tempdir().expect("empty PKI dir");
    let pair = Pair::builder().start().await;
    let before = fixture::migrate_parameters(&pair.source).await;
    let options = pair.options(&lab.host("src", &["src-host"]), unsecured.path());

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Failed);
    assert_eq!(fixture::error_kind(&report), Some("mixed-security"));
    let message = fixture::error_message(&report);
    assert!(message.contains("destination"), "{message}");
    assert!(
        message.contains("ca-cert.pem"),
        "names the missing file: {message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    assert_eq!(fixture::migrate_parameters(&pair.source).await, before);
    assert_eq!(fixture::status(&pair.dest).await, "inmigrate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_on_one_side_fails_the_handshake_and_the_source_runs_on() {
    let (lab_a, lab_b) = (Lab::new("CA A"), Lab::new("CA B"));
    let pair = Pair::builder().start().await;
    let options = pair.options(
        &lab_a.host("src", &["src-host"]),
        &lab_b.host("dst", &[DEST_HOST]),
    );

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Failed);
    fixture::assert_error_kind(&report, "tls-handshake");
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_not_naming_the_tls_hostname_is_refused_at_the_handshake() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let options = pair.options(
        &lab.host("src", &["src-host"]),
        &lab.host("dst", &["some-other-host"]),
    );

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Failed);
    fixture::assert_error_kind(&report, "tls-handshake");
    let message = fixture::error_message(&report);
    assert!(message.contains(DEST_HOST), "{message}");
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_qemu_cannot_read_is_caught_by_the_preflight() {
    let lab = Lab::new("Test CA");
    let src_pki = lab.host("src", &["src-host"]);
    let dst_pki = lab.host("dst", &[DEST_HOST]);
    fixture::open_path_for_others(&src_pki);
    fixture::open_path_for_others(&dst_pki);
    // The source QEMU runs as nobody (as libvirt runs QEMU as its own user); the key stays
    // 0640 root:root, so root can read it and QEMU cannot.
    let pair = Pair::builder()
        .tweak(|c| c.run_as = Some("nobody".into()))
        .start()
        .await;
    // The destination runs as nobody too; give it its key so only the source is affected.
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("passwd")
        .expect("user nobody");
    nix::unistd::chown(&dst_pki.join("server-key.pem"), Some(nobody.uid), None).expect("chown");
    let options = pair.options(&src_pki, &dst_pki);

    let report = fixture::migrate(&options).await;

    fixture::assert_error_kind(&report, "credentials-unusable");
    let message = fixture::error_message(&report);
    assert!(message.contains("source"), "{message}");
    assert!(
        message.contains(&src_pki.display().to_string()),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_killed_mid_migration_leaves_the_source_running() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder().start().await;
    let mut options = pair.tls_options(&lab);
    options.max_bandwidth = 16 << 20; // 64 MiB of data takes ~4 s
    let dest_pid = pair.dest.pid().expect("destination pid");
    let mut killed = false;

    let report = fixture::migrate_observed(
        &options,
        |p| {
            let sent = p.ram.map(|r| r.transferred).unwrap_or(0);
            if !killed && p.phase == Phase::Ram && sent > 8 << 20 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(dest_pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                killed = true;
            }
        },
        &CancellationToken::new(),
    )
    .await;

    assert!(
        killed,
        "the migration ended before the destination could be killed"
    );
    assert_eq!(report.status, FinalStatus::Failed);
    assert!(
        matches!(
            fixture::error_kind(&report),
            Some("destination-died" | "migration-failed")
        ),
        "{:?}",
        report.error
    );
    assert!(
        pair.dest.wait_exit(fixture::EVENT_TIMEOUT).await,
        "the killed destination exits"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_stops_answering_mid_migration_times_out() {
    let lab = Lab::new("Test CA");
    let mut pair = Pair::builder().start().await;
    let mut options = pair.tls_options(&lab);
    options.max_bandwidth = 16 << 20;
    options.stall_timeout = Duration::from_secs(3);
    options.qmp_timeout = Duration::from_secs(3);
    let dest_pid = nix::unistd::Pid::from_raw(pair.dest.pid().expect("pid") as i32);
    let mut stopped = false;

    let report = fixture::migrate_observed(
        &options,
        |p| {
            if !stopped && p.status == Some(MigrationStatus::Active) {
                let _ = nix::sys::signal::kill(dest_pid, nix::sys::signal::Signal::SIGSTOP);
                stopped = true;
            }
        },
        &CancellationToken::new(),
    )
    .await;

    assert!(stopped);
    assert_eq!(report.status, FinalStatus::Failed);
    fixture::assert_error_kind(&report, "stalled");
    fixture::assert_source_untouched(&pair.source).await;
    pair.dest.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_whose_qmp_never_answers_is_a_timeout_naming_its_socket() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let mut options = pair.tls_options(&lab);
    options.qmp_timeout = Duration::from_secs(2);
    let dest_pid = nix::unistd::Pid::from_raw(pair.dest.pid().expect("pid") as i32);
    nix::sys::signal::kill(dest_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");

    let report = fixture::migrate(&options).await;

    nix::sys::signal::kill(dest_pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
    fixture::assert_error_kind(&report, "timeout");
    let message = fixture::error_message(&report);
    assert!(
        message.contains(&pair.dest.qmp_path().display().to_string()),
        "{message}"
    );
    fixture::assert_source_untouched(&pair.source).await;
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_used_by_the_next_migration_without_restarts() {
    let lab = Lab::new("Test CA");
    // Both hosts carry the name the tests connect with, so the VM can migrate back and forth.
    let host_a = lab.host("host-a", &[DEST_HOST, "host-a"]);
    let host_b = lab.host("host-b", &[DEST_HOST, "host-b"]);
    let pair = Pair::builder().start().await;
    let old_b = fixture::cert_der(&host_b.join("server-cert.pem"));
    let old_a = fixture::cert_der(&host_a.join("server-cert.pem"));
    // TLS 1.2, so that the server's Certificate message crosses the wire in the clear.
    let priority = Some("NORMAL:-VERS-ALL:+VERS-TLS1.2".to_string());
    let tap = WireTap::start(pair.dest.monitor_path().to_path_buf()).await;
    let mut there = pair.options(&host_a, &host_b);
    there.source_connect = Some(tap.addr.parse().expect("tap address"));
    there.tls_priority = priority.clone();

    let first = fixture::migrate(&there).await;

    assert_eq!(first.status, FinalStatus::Completed, "{:?}", first.error);
    assert!(
        contains(&tap.server_bytes(), &old_b),
        "host-b presented its certificate"
    );

    // Renew both hosts' certificates in place (new serial numbers); no QEMU is restarted.
    let renew = |dir: &std::path::Path, name: &str, serial: u64| {
        let mut cert =
            qemu_tls_migrate::pki::HostCert::new(vec![DEST_HOST.to_string(), name.to_string()]);
        cert.serial = Some(serial);
        lab.ca.write_host_dir(dir, &cert).expect("renew");
    };
    renew(&host_a, "host-a", 0xA2);
    renew(&host_b, "host-b", 0xB2);
    let new_a = fixture::cert_der(&host_a.join("server-cert.pem"));
    assert_ne!(new_a, old_a);

    // Back again: the VM runs on the first destination (host-b), and a new QEMU on host-a
    // takes it.
    let back = pair.next_destination("back").await;
    let tap = WireTap::start(back.monitor_path().to_path_buf()).await;
    let mut home = pair.options(&host_b, &host_a);
    home.source.qmp = pair.dest.qmp_path().to_path_buf();
    home.dest.qmp = back.qmp_path().to_path_buf();
    home.source_connect = Some(tap.addr.parse().expect("tap address"));
    home.tls_priority = priority;

    let second = fixture::migrate(&home).await;

    assert_eq!(second.status, FinalStatus::Completed, "{:?}", second.error);
    let seen = tap.server_bytes();
    assert!(
        contains(&seen, &new_a),
        "the second handshake used host-a's renewed certificate"
    );
    assert!(!contains(&seen, &old_a));
}

/// Two CloudStack hosts under temporary roots, each secured by `host secure` from its agent's
/// certificate (one for both roles, carrying the name the tests connect with).
fn cloudstack_hosts(lab: &Lab) -> [tempfile::TempDir; 2] {
    use fixture::cloudstack;
    use qemu_tls_migrate::host::{SecureOptions, plan_secure};
    [("host-a", 0xA1), ("host-b", 0xB1)].map(|(name, serial)| {
        let root = tempfile::tempdir().expect("root");
        cloudstack::provision(root.path(), &lab.ca, &[DEST_HOST, name], serial);
        plan_secure(&SecureOptions::new(root.path()))
            .and_then(|plan| plan.apply())
            .expect("host secure");
        root
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudstack_renewal_then_migration_presents_the_new_certificate() {
    use fixture::cloudstack;
    let lab = Lab::new("CloudStack CA");
    let [root_a, root_b] = cloudstack_hosts(&lab);
    let pair = Pair::builder().start().await;
    let (pki_a, pki_b) = (
        cloudstack::qemu_pki_dir(root_a.path()),
        cloudstack::qemu_pki_dir(root_b.path()),
    );
    let old_b = fixture::cert_der(&pki_b.join("server-cert.pem"));
    // CloudStack renews both hosts' certificates; the follower does not run (no systemd), so
    // /etc/pki/qemu is left stale on both.
    cloudstack::keystore_cert_import(root_a.path(), &lab.ca, &[DEST_HOST, "host-a"], 0xA2);
    cloudstack::keystore_cert_import(root_b.path(), &lab.ca, &[DEST_HOST, "host-b"], 0xB2);
    let new_b = fixture::cert_der(&cloudstack::agent_dir(root_b.path()).join("cloud.crt"));
    // TLS 1.2, so that the server's Certificate message crosses the wire in the clear.
    let tap = WireTap::start(pair.dest.monitor_path().to_path_buf()).await;
    let mut options = pair.options(&pki_a, &pki_b);
    options.source_cloudstack_dir = Some(cloudstack::agent_dir(root_a.path()));
    options.dest_cloudstack_dir = Some(cloudstack::agent_dir(root_b.path()));
    options.source_connect = Some(tap.addr.parse().expect("tap address"));
    options.tls_priority = Some("NORMAL:-VERS-ALL:+VERS-TLS1.2".to_string());

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_ne!(new_b, old_b);
    let seen = tap.server_bytes();
    assert!(
        contains(&seen, &new_b),
        "host-b presented its renewed certificate"
    );
    assert!(!contains(&seen, &old_b), "not the stale copy");
    let refreshed = report
        .warnings
        .iter()
        .filter(|w| w.contains("was refreshed from"))
        .count();
    assert_eq!(refreshed, 2, "both ends refreshed: {:?}", report.warnings);
    assert_eq!(
        fixture::cert_der(&pki_a.join("client-cert.pem")),
        fixture::cert_der(&cloudstack::agent_dir(root_a.path()).join("cloud.crt"))
    );
}

/// A report's error with its sources, joined as the binary prints them.
fn error_chain(report: &qemu_tls_migrate::migration::Report) -> String {
    let mut out = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> =
        report.error.as_ref().map(|e| e as _);
    while let Some(e) = next {
        out.push(e.to_string());
        next = e.source();
    }
    out.join(": ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_cloudstack_copy_in_another_layout_is_refused_naming_the_files_and_the_fix() {
    use fixture::cloudstack;
    let lab = Lab::new("CloudStack CA");
    // A PKI directory laid out by hand (a certificate per role), not by `host secure`, on a
    // host whose agent holds another certificate from the same CA.
    let (host_a, host_b) = (
        lab.host("host-a", &[DEST_HOST]),
        lab.host("host-b", &[DEST_HOST]),
    );
    let root = tempfile::tempdir().expect("root");
    cloudstack::provision(root.path(), &lab.ca, &[DEST_HOST], 7);
    let before = std::fs::read(host_a.join("client-cert.pem")).expect("read");
    let pair = Pair::builder().start().await;
    let mut options = pair.options(&host_a, &host_b);
    options.source_cloudstack_dir = Some(cloudstack::agent_dir(root.path()));
    options.dest_cloudstack_dir = None;

    let report = fixture::migrate(&options).await;

    assert!(report.refused, "{:?}", report.error);
    fixture::assert_error_kind(&report, "pki-broken");
    let text = error_chain(&report);
    for named in [
        host_a.join("client-cert.pem").display().to_string(),
        cloudstack::agent_dir(root.path())
            .join("cloud.crt")
            .display()
            .to_string(),
        "`host secure`'s layout".to_string(),
        "run `qemu-tls-migrate host secure`".to_string(),
    ] {
        assert!(text.contains(&named), "{named} in: {text}");
    }
    assert_eq!(
        std::fs::read(host_a.join("client-cert.pem")).expect("read"),
        before
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_auto_refuses_when_cloudstack_and_the_pki_check_disagree() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    // The agent is installed but CloudStack never provisioned a certificate: not secured to
    // CloudStack, while the tool's PKI directories pass every check.
    let agent = tempfile::tempdir().expect("agent dir");
    std::fs::write(agent.path().join("agent.properties"), "host=198.18.0.10\n").expect("write");
    let mut options = pair.tls_options(&lab);
    options.transport = TransportChoice::Auto;
    options.source_cloudstack_dir = Some(agent.path().to_path_buf());
    options.dest_cloudstack_dir = None;
    let mut explicit = options.clone();
    explicit.transport = TransportChoice::Tls;

    let refused = fixture::migrate(&options).await;

    assert!(refused.refused, "{:?}", refused.error);
    fixture::assert_error_kind(&refused, "mixed-security");
    let text = error_chain(&refused);
    assert!(
        text.contains("CloudStack calls this host not secured"),
        "{text}"
    );
    assert!(
        text.contains(&options.source.pki_dir.display().to_string()),
        "{text}"
    );
    fixture::assert_source_untouched(&pair.source).await;
    // An explicit --transport is the operator's word: it goes ahead.
    let report = fixture::migrate(&explicit).await;
    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multifd_over_tls_completes_and_the_parameters_are_put_back() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let before = fixture::migrate_parameters(&pair.source).await;
    let mut options = pair.tls_options(&lab);
    options.multifd = qemu_tls_migrate::migration::Multifd::Channels(4);
    options.downtime_limit = Some(Duration::from_millis(500));

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(report.transport, Some(Transport::Tls));
    assert_eq!(fixture::status(&pair.dest).await, "running");
    assert_eq!(fixture::migrate_parameters(&pair.source).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_authorising_another_identity_refuses_the_source() {
    let lab = Lab::new("Test CA");
    let pair = Pair::builder().start().await;
    let mut options = pair.tls_options(&lab);
    options.authz = qemu_tls_migrate::peer::Authz::Identity("CN=some-other-host".into());

    let report = fixture::migrate(&options).await;

    assert_eq!(report.status, FinalStatus::Failed);
    assert!(
        matches!(
            fixture::error_kind(&report),
            Some("tls-handshake" | "migration-failed" | "destination-died")
        ),
        "{:?}",
        report.error
    );
    fixture::assert_source_untouched(&pair.source).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_authorises_a_many_part_subject_only_in_the_form_gnutls_prints_it() {
    let lab = Lab::new("Test CA");
    let (_, subject) = fixture::authz_subjects()
        .into_iter()
        .next()
        .expect("a subject");
    let src_pki = lab.host_with_subject("src", &["src-host"], subject);
    let dst_pki = lab.host("dst", &[DEST_HOST]);
    let der = fixture::client_cert_der(&src_pki);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("certificate");
    // What the service set as tls-authz before (x509-parser's rendering of the same name).
    let other_rendering = cert.subject().to_string();
    let gnutls_form = qemu_tls_migrate::pki::certificate_authz_dn(&der).expect("subject");
    let refused_pair = Pair::builder().start().await;
    let mut refused_options = refused_pair.options(&src_pki, &dst_pki);
    refused_options.authz = qemu_tls_migrate::peer::Authz::Identity(other_rendering.clone());
    let pair = Pair::builder().start().await;
    let mut options = pair.options(&src_pki, &dst_pki);
    options.authz = qemu_tls_migrate::peer::Authz::Identity(gnutls_form.clone());

    let refused = fixture::migrate(&refused_options).await;
    let report = fixture::migrate(&options).await;

    assert_eq!(
        gnutls_form,
        "C=US,ST=Bavaria,L=Munich,O=Acme,OU=Migrations,CN=host-b"
    );
    assert_eq!(refused.status, FinalStatus::Failed, "{other_rendering}");
    fixture::assert_source_untouched(&refused_pair.source).await;
    assert_eq!(report.status, FinalStatus::Completed, "{:?}", report.error);
    assert_eq!(report.transport, Some(Transport::Tls));
    assert_eq!(fixture::status(&pair.dest).await, "running");
}
