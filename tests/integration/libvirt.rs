//! The libvirt layer against real libvirtd 9.0 daemons: two [`LibvirtHost`]s (source `b`,
//! destination `a`), shared by the tests of this file that run at the same time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qemu_tls_migrate::libvirt::{DomainXml, Libvirt, LibvirtError, StateKind};
use qemu_tls_migrate::qemu::{QueryStatus, QueryVersion};
use qemu_tls_migrate::qmp::Qmp;
use qemu_tls_migrate::vm::{DiskFormat, binary, create_image};

use crate::fixture::{
    self, Cli, Lab, LibvirtHost, LibvirtPair, Service, domain_name, open_path_for_others,
    small_domain_xml,
};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// An empty qcow2 image of 64 MiB at `path`.
pub(crate) fn qcow2(path: &Path) {
    create_image(path, DiskFormat::Qcow2, 64 << 20).expect("qemu-img create");
}

/// Domain `name`'s migratable XML on host b.
fn source_xml(pair: &LibvirtPair, name: &str) -> DomainXml {
    Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(name))
        .and_then(|d| d.migratable_xml())
        .expect("migratable XML")
}

/// A lab PKI: host-a's directory (readable by libvirt's QEMU) and host-b's.
pub(crate) fn libvirt_lab() -> (Lab, PathBuf, PathBuf) {
    let lab = Lab::new("Test CA");
    let (pki_a, pki_b) = (
        lab.host("host-a", &["host-a"]),
        lab.host("host-b", &["host-b"]),
    );
    open_path_for_others(&pki_a);
    (lab, pki_a, pki_b)
}

/// Defines and starts (with `virsh`, inside `host`) a small domain with a qcow2 disk and a QMP
/// monitor declared in `<qemu:commandline>`; returns its name and monitor path.
pub(crate) async fn start_domain(host: &LibvirtHost, what: &str) -> (String, PathBuf) {
    let name = domain_name(what);
    let monitor = host.qmp_dir().join(format!("{name}.sock"));
    start_named_domain(host, &name, Some(&monitor)).await;
    (name, monitor)
}

/// Defines and starts domain `name` with a qcow2 disk, and a QMP monitor at `monitor` if given.
async fn start_named_domain(host: &LibvirtHost, name: &str, monitor: Option<&Path>) {
    let disk = host.images_dir().join(format!("{name}.qcow2"));
    qcow2(&disk);
    let xml_path = host.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(name, &disk, monitor)).expect("XML");
    let xml_arg = xml_path.to_str().expect("UTF-8 path");
    host.virsh_ok(&["define", xml_arg]).await;
    host.virsh_ok(&["start", name]).await;
}

#[tokio::test]
async fn libvirt_domain_is_found_with_its_declared_monitor_answering_qmp() {
    let pair = LibvirtPair::shared();
    let (name, monitor) = start_domain(&pair.b, "found").await;

    let libvirt = Libvirt::connect(&pair.b.uri()).expect("connect");
    let domain = libvirt.domain(&name).expect("lookup");
    let state = domain.state().expect("state");
    let job = domain.job_active().expect("job");
    let xml = domain.migratable_xml().expect("XML");
    let declared = domain.declared_monitor().expect("monitor");
    let qmp = Qmp::connect(&monitor, QMP_TIMEOUT).await.expect("QMP");
    let status = qmp.call(&QueryStatus).await.expect("query-status").status;
    let running = qmp.call(&QueryVersion).await.expect("query-version").qemu;
    drop(qmp);
    // The domain runs the suite's QEMU (QTM_QEMU in the 10.0 pass), through the emulator libvirt
    // lists.
    let expected = binary::version(fixture::emulator()).expect("the emulator's -version");
    let listed = libvirt.emulators().expect("the host's emulators");

    assert_eq!(
        (running.major, running.minor, running.micro),
        (expected.major, expected.minor, expected.micro),
        "the domain's QEMU is {}'s",
        fixture::emulator().display()
    );
    assert!(
        listed.iter().any(|e| Path::new(e) == fixture::emulator()),
        "libvirt lists the test domains' emulator: {listed:?}"
    );
    assert_eq!(state.kind, StateKind::Running);
    assert!(!job, "no libvirt job runs on a freshly started domain");
    assert_eq!(xml.name().expect("name"), name);
    assert_eq!(declared, Some(monitor.clone()));
    assert_eq!(
        xml.declared_monitor().expect("monitor").map(|m| m.path),
        Some(monitor),
        "dumpxml --migratable keeps the <qemu:commandline> monitor"
    );
    assert_eq!(status, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    assert!(
        !pair.a.virsh(&["domstate", &name]).await.status.success(),
        "host a must not see host b's domain"
    );
}

#[tokio::test]
async fn unknown_domain_is_an_error_naming_it() {
    let pair = LibvirtPair::shared();
    let libvirt = Libvirt::connect(&pair.a.uri()).expect("connect");

    let err = libvirt
        .domain("qtm-no-such-domain")
        .expect_err("no such domain");

    assert!(
        matches!(&err, LibvirtError::NoSuchDomain { name, .. } if name == "qtm-no-such-domain"),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"qtm-no-such-domain\""), "{err}");
}

#[tokio::test]
async fn migratable_xml_starts_paused_on_the_other_host_then_resumes_and_is_destroyed() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "copied").await;
    let source = Libvirt::connect(&pair.b.uri()).expect("connect b");
    let xml = source
        .domain(&name)
        .and_then(|d| d.migratable_xml())
        .expect("migratable XML");
    let copy_name = format!("{name}-copy");
    let copy_disk = pair.a.images_dir().join(format!("{copy_name}.qcow2"));
    qcow2(&copy_disk);
    let copy_monitor = pair.a.qmp_dir().join(format!("{copy_name}.sock"));
    let copy_xml: DomainXml = xml
        .with_name(&copy_name)
        .and_then(|x| x.without_uuid())
        .and_then(|x| x.with_disk_file("vda", &copy_disk))
        .and_then(|x| x.with_monitor(&copy_monitor))
        .expect("edited XML");
    let dest = Libvirt::connect(&pair.a.uri()).expect("connect a");

    let created = dest.create_paused(&copy_xml).expect("create paused");
    let uuids = (
        created.uuid().expect("uuid"),
        source.domain(&name).and_then(|d| d.uuid()).expect("uuid"),
    );
    let paused = created.state().expect("state");
    let paused_virsh = pair.a.virsh_ok(&["domstate", "--reason", &copy_name]).await;
    let qmp = Qmp::connect(&copy_monitor, QMP_TIMEOUT).await.expect("QMP");
    let qemu_paused = qmp.call(&QueryStatus).await.expect("query-status").status;
    drop(qmp);
    created.resume().expect("resume");
    let resumed = created.state().expect("state");
    let resumed_virsh = pair.a.virsh_ok(&["domstate", "--reason", &copy_name]).await;
    created.destroy().expect("destroy");
    let after_destroy = dest.domain(&copy_name);

    assert_eq!(paused.kind, StateKind::Paused);
    assert_eq!(paused_virsh, "paused (user)");
    assert_eq!(qemu_paused, "prelaunch");
    assert_ne!(uuids.0, uuids.1, "the copy got a new UUID");
    assert_eq!(resumed.kind, StateKind::Running);
    assert_eq!(resumed_virsh, "running (unpaused)");
    assert!(
        matches!(after_destroy, Err(LibvirtError::NoSuchDomain { .. })),
        "a destroyed transient domain is gone: {after_destroy:?}"
    );
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
}

#[tokio::test]
async fn our_binary_runs_inside_a_libvirt_host_and_sees_its_libvirtd() {
    let pair = LibvirtPair::shared();

    let version = Cli::new(["--version"]).in_host(&pair.a).output().await;
    let socket = pair
        .a
        .command("test")
        .args(["-S", "/run/libvirt/libvirt-sock"])
        .status()
        .await
        .expect("test -S");

    assert!(version.status.success(), "{version:?}");
    assert!(
        socket.success(),
        "the host's /run/libvirt is visible inside it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_migrates_by_name_over_tls_into_a_domain_waiting_on_the_other_host() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "by-name").await;
    let dest_monitor = start_waiting_destination(&pair, &name);
    let (_lab, pki_a, pki_b) = libvirt_lab();
    let args = by_name_args(
        &pair,
        &name,
        &dest_monitor,
        (&pki_a, &pki_b),
        &["--all-local-disks"],
    );

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transport"], "tls");
    assert_eq!(json["disks"].as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "paused");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test]
async fn an_unknown_domain_is_refused_by_name_with_exit_3() {
    let pair = LibvirtPair::shared();

    refused_by_name(&pair, "qtm-no-such-domain", &[], "no-such-domain").await;
}

/// The destination as `serve --libvirt` is to make it for domain `name` of host b: the same
/// XML, its own empty disk and monitor, started paused on host a and waiting with `-incoming
/// defer`. Returns its monitor.
fn start_waiting_destination(pair: &LibvirtPair, name: &str) -> PathBuf {
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    qcow2(&dest_disk);
    let dest_monitor = pair.a.qmp_dir().join(format!("{name}-in.sock"));
    let dest_xml = source_xml(pair, name)
        .with_disk_file("vda", &dest_disk)
        .and_then(|x| x.with_monitor(&dest_monitor))
        .and_then(|x| x.with_qemu_args(&["-incoming", "defer"]))
        .expect("destination XML");
    Libvirt::connect(&pair.a.uri())
        .and_then(|l| l.create_paused(&dest_xml))
        .expect("destination domain");
    dest_monitor
}

/// `migrate --json --domain NAME` from host b straight to the QEMU at `dest_monitor` on host
/// a (over a's address), with the PKI directories `pkis` (host a's, host b's) and `extra`.
fn by_name_args(
    pair: &LibvirtPair,
    name: &str,
    dest_monitor: &Path,
    (pki_a, pki_b): (&Path, &Path),
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "migrate",
        "--json",
        "--domain",
        name,
        "--connect",
        &pair.b.uri(),
        "--dest-qmp",
        &dest_monitor.display().to_string(),
        "--dest-host",
        "host-a",
        "--dest-address",
        &pair.hosts.a_addr,
        "--source-pki-dir",
        &pki_b.display().to_string(),
        "--dest-pki-dir",
        &pki_a.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// `migrate --domain NAME` (with `extra` arguments) from host b towards a destination that is
/// never reached: it must be refused with exit 3 and error `kind`. Returns the JSON result.
async fn refused_by_name(
    pair: &LibvirtPair,
    name: &str,
    extra: &[&str],
    kind: &str,
) -> serde_json::Value {
    let uri = pair.b.uri();
    let mut args = vec![
        "migrate",
        "--json",
        "--domain",
        name,
        "--connect",
        &uri,
        "--dest-qmp",
        "/nonexistent.sock",
        "--dest-host",
        "host-a",
    ];
    args.extend_from_slice(extra);

    let out = Cli::new(&args).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], kind, "{json}");
    json
}

/// The source domain's migratable XML with its disk moved to `disk`: what the CloudStack agent
/// passes as `--dest-xml`. Written to a file in `dir`.
pub(crate) fn dest_xml_file(pair: &LibvirtPair, name: &str, disk: &Path) -> PathBuf {
    let xml = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(name))
        .and_then(|d| d.migratable_xml())
        .and_then(|x| x.with_disk_file("vda", disk))
        .expect("destination XML");
    let path = pair.b.dir.path().join(format!("{name}-dest.xml"));
    std::fs::write(&path, xml.as_str()).expect("write XML");
    path
}

/// A running domain on host b whose disk is a qcow2 overlay (4 MiB of its own data) on a
/// 64 MiB raw template in b's pool, and a template of the same file name in a's pool: a copy of
/// b's when `same`, another of the same size when not. Returns the domain's name, its disk, and
/// a's template.
async fn start_overlay_domain(
    pair: &LibvirtPair,
    what: &str,
    same: bool,
) -> (String, PathBuf, PathBuf) {
    let name = domain_name(what);
    let template_name = format!("{name}-template.raw");
    let (src_template, dst_template) = (
        pair.b.images_dir().join(&template_name),
        pair.a.images_dir().join(&template_name),
    );
    for (template, pattern) in [
        (&src_template, 0x11),
        (&dst_template, if same { 0x11 } else { 0x33 }),
    ] {
        qemu_tls_migrate::vm::create_image(template, DiskFormat::Raw, 64 << 20).expect("template");
        fixture::qemu_io(
            template,
            DiskFormat::Raw,
            &format!("write -P 0x{pattern:x} 0 64M"),
        );
    }
    let disk = pair.b.images_dir().join(format!("{name}.qcow2"));
    fixture::create_overlay(&disk, &src_template);
    fixture::qemu_io(&disk, DiskFormat::Qcow2, "write -P 0x22 1M 4M");
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(&name, &disk, Some(&monitor))).expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8 path")])
        .await;
    pair.b.virsh_ok(&["start", &name]).await;
    (name, disk, dst_template)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_refuses_a_top_only_copy_onto_another_template_of_the_same_name() {
    let pair = LibvirtPair::shared();
    let (name, _disk, dst_template) = start_overlay_domain(&pair, "wrongtpl", false).await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let (_lab, _service, mut args) = served_migration(&pair, &name, &dest_disk).await;
    args.extend(["--disk-copy".to_string(), "top".to_string()]);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(json["error"]["kind"], "backing-mismatch", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("differs") && message.contains(&dst_template.display().to_string()),
        "{message}"
    );
    assert_eq!(
        pair.b.virsh_ok(&["domstate", &name]).await.trim(),
        "running",
        "the source runs on"
    );
    let listed = pair.a.virsh_ok(&["list", "--all", "--name"]).await;
    assert!(!listed.lines().any(|l| l.trim() == name), "{listed}");
    assert!(!dest_disk.exists(), "the disk made for the copy is removed");
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_creates_the_overlay_on_its_own_template_copy_for_a_disk_copied_top_only() {
    let pair = LibvirtPair::shared();
    let (name, disk, dst_template) = start_overlay_domain(&pair, "overlay", true).await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let (_lab, _service, mut args) = served_migration(&pair, &name, &dest_disk).await;
    // Top-only for this disk alone (`--disk-copy top` for all is the refusal test's).
    args.retain(|a| a != "--all-local-disks");
    args.extend(["--disk".to_string(), "vda,copy=top".to_string()]);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["disks"][0]["copy"], "top", "{json}");
    let info = fixture::image_info(&dest_disk);
    assert_eq!(
        info["backing-filename"].as_str(),
        dst_template.to_str(),
        "the destination's overlay sits on the destination's own template"
    );
    let dest_qmp = Qmp::connect(&incoming_monitor(&pair.a, &name).await, QMP_TIMEOUT)
        .await
        .expect("destination QMP");
    let blocks = dest_qmp
        .call(&qemu_tls_migrate::qemu::QueryBlock)
        .await
        .expect("query-block");
    drop(dest_qmp);
    let opened: Vec<String> = blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref()?.image.as_ref())
        .flat_map(|i| i.chain().map(|i| i.filename.clone()).collect::<Vec<_>>())
        .collect();
    assert!(
        opened.contains(&dst_template.display().to_string()),
        "the destination QEMU reads its own template: {opened:?}"
    );
    fixture::images_identical(&disk, &dest_disk).expect("same content through the chain");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_refuses_an_existing_disk_path_and_leaves_no_domain() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "taken").await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    std::fs::write(&dest_disk, b"someone else's data").expect("existing file");
    let (_lab, _service, args) = served_migration(&pair, &name, &dest_disk).await;

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "destination-disk", "{json}");
    assert_eq!(
        std::fs::read(&dest_disk).expect("still there"),
        b"someone else's data"
    );
    assert!(!pair.a.virsh(&["domstate", &name]).await.status.success());
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// The QMP socket `serve --libvirt` gave the incoming domain `name` on `host` (its path seen
/// from outside the host's namespaces).
pub(crate) async fn incoming_monitor(host: &LibvirtHost, name: &str) -> PathBuf {
    let (uri, name) = (host.uri(), name.to_string());
    let inside = tokio::task::spawn_blocking(move || {
        Libvirt::connect(&uri)
            .and_then(|l| l.domain(&name))
            .and_then(|d| d.declared_monitor())
    })
    .await
    .expect("lookup")
    .expect("the incoming domain")
    .expect("a declared monitor");
    host.outside(&inside)
}

/// A lab PKI and `serve --libvirt` on host a (its QMP directory, its libvirtd); returns the
/// lab (kept alive by the caller), the service and host b's PKI directory.
pub(crate) async fn libvirt_service(pair: &LibvirtPair) -> (Lab, Service, String) {
    libvirt_service_on(pair, &pair.hosts.a_addr, &["--libvirt"]).await
}

/// [`libvirt_service`] listening on `addr`, with these arguments added (`--libvirt` among them).
pub(crate) async fn libvirt_service_on(
    pair: &LibvirtPair,
    addr: &str,
    extra: &[&str],
) -> (Lab, Service, String) {
    let (lab, pki_a, pki_b) = libvirt_lab();
    let service = Service::builder(&pki_a, &pair.a.qmp_dir())
        .in_host(&pair.a)
        .listen(addr)
        .args(extra)
        .start()
        .await;
    (lab, service, pki_b.display().to_string())
}

/// `serve --libvirt` on host a and the agent's command line that migrates domain `name` of
/// host b there, its disk moved to `dest_disk` (see [`dest_xml_file`]): the lab (kept alive by
/// the caller), the service and the arguments.
pub(crate) async fn served_migration(
    pair: &LibvirtPair,
    name: &str,
    dest_disk: &Path,
) -> (Lab, Service, Vec<String>) {
    let dest_xml = dest_xml_file(pair, name, dest_disk);
    let (lab, service, pki_b) = libvirt_service(pair).await;
    let args = served_args(name, &service.addr, &pki_b, &dest_xml.display().to_string());
    (lab, service, args)
}

/// A `migrate --domain NAME --to SERVICE` command line with `--dest-xml` and disk copy.
pub(crate) fn served_args(name: &str, service: &str, pki: &str, dest_xml: &str) -> Vec<String> {
    [
        "migrate",
        "--json",
        "--domain",
        name,
        "--to",
        service,
        "--dest-host",
        "host-a",
        "--pki-dir",
        pki,
        "--dest-xml",
        dest_xml,
        "--all-local-disks",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_refuses_a_domain_of_the_same_name_running_there() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "twice").await;
    // The same name already runs on host a.
    let other_disk = pair.a.images_dir().join(format!("{name}-other.qcow2"));
    qcow2(&other_disk);
    let other_xml = pair.a.dir.path().join(format!("{name}-other.xml"));
    std::fs::write(&other_xml, small_domain_xml(&name, &other_disk, None)).expect("XML");
    let (_, dest_disk) = refused_as_existing(&pair, &name, &other_xml).await;

    assert!(!dest_disk.exists(), "no disk was created");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_without_a_monitor_of_its_own_migrates_through_libvirts_qmp_passthrough() {
    let pair = LibvirtPair::shared();
    // The two-disk domain of the end-to-end test, without a monitor in its XML.
    let (name, disks) = start_busy_domain(&pair, "passthrough", false).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let args = agent_args(&name, &service.addr, &pki_b, &dest_xml);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["source_qmp"], "libvirt-passthrough", "{json}");
    assert_eq!(json["transport"], "tls");
    assert_eq!(json["disks"].as_array().map(Vec::len), Some(2), "{json}");
    assert_moved(&pair, &name, &disks).await;
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_migrate_of_a_domain_driven_through_the_passthrough_is_refused_busy() {
    let pair = LibvirtPair::shared();
    let name = domain_name("busy");
    // No monitor of its own: each run reaches QEMU through a passthrough socket of its own, so
    // only the domain's UUID tells that two runs drive one VM.
    let dest_monitor = start_slow_to_copy_domain(&pair, &name, None).await;
    let (_lab, pki_a, pki_b) = libvirt_lab();
    let args = |job: &str| {
        let extra = ["--disk", "vda", "--disk-bandwidth", "2M", "--job-id", job];
        by_name_args(&pair, &name, &dest_monitor, (&pki_a, &pki_b), &extra)
    };
    let first_id = format!("{name}-first");
    let first = tokio::spawn({
        let args = args(&first_id);
        async move { Cli::new(&args).output().await }
    });
    wait_block_job(&pair, &name).await;

    let retry = Cli::new(args(&format!("{name}-retry"))).output().await;
    let first = first.await.expect("first run");

    let refusal = fixture::stdout_json(&retry);
    assert_eq!(retry.status.code(), Some(3), "{refusal}");
    assert_eq!(refusal["error"]["kind"], "busy", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains(&format!("job {first_id}")), "{message}");
    let report = fixture::stdout_json(&first);
    assert_eq!(first.status.code(), Some(0), "{report}");
    assert_eq!(report["source_qmp"], "libvirt-passthrough", "{report}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// Waits (60 s at most) until the source domain `name` runs a block job (asked through
/// libvirt's own monitor).
pub(crate) async fn wait_block_job(pair: &LibvirtPair, name: &str) {
    let seen = source_monitor_says(pair, name, r#"{"execute":"query-block-jobs"}"#, |v| {
        v["return"].as_array().is_some_and(|jobs| !jobs.is_empty())
    })
    .await;
    assert!(seen, "the first run never started copying the disk");
}

/// Asks the source domain `name`'s QEMU `command` through libvirt's own monitor (beside the
/// tool's declared one) until its reply satisfies `done`, 60 s at most; whether it did.
pub(crate) async fn source_monitor_says(
    pair: &LibvirtPair,
    name: &str,
    command: &'static str,
    done: fn(&serde_json::Value) -> bool,
) -> bool {
    let (uri, name) = (pair.b.uri(), name.to_string());
    tokio::task::spawn_blocking(move || {
        let domain = Libvirt::connect(&uri)
            .and_then(|l| l.domain(&name))
            .expect("source domain");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let reply = domain.monitor_command(command).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&reply).unwrap_or_default();
            if done(&v) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    })
    .await
    .expect("poller")
}

/// A domain on host b made for a full migration: our guest workload (its RAM not zero pages),
/// a qcow2 `vda` of 64 MiB filled with 0x5a and a raw `vdb` of 32 MiB filled with 0xa5, and a
/// QMP monitor declared when `monitor`. Returns its name and its disks (target, source image,
/// the destination image the caller's XML will name).
async fn start_busy_domain(
    pair: &LibvirtPair,
    what: &str,
    monitor: bool,
) -> (String, Vec<(&'static str, PathBuf, PathBuf)>) {
    start_domain_dirtying(pair, what, monitor, 32).await
}

/// [`start_busy_domain`] whose workload dirties `wss_mib` MiB.
async fn start_domain_dirtying(
    pair: &LibvirtPair,
    what: &str,
    monitor: bool,
    wss_mib: u32,
) -> (String, Vec<(&'static str, PathBuf, PathBuf)>) {
    let name = domain_name(what);
    let images = pair.b.images_dir();
    let disks = vec![
        (
            "vda",
            images.join(format!("{name}.qcow2")),
            DiskFormat::Qcow2,
            64,
            0x5a,
        ),
        (
            "vdb",
            images.join(format!("{name}.raw")),
            DiskFormat::Raw,
            32,
            0xa5,
        ),
    ];
    for (_, path, format, mib, pattern) in &disks {
        create_image(path, *format, mib << 20).expect("qemu-img create");
        fixture::qemu_io(path, *format, &format!("write -P {pattern} 0 {mib}M"));
    }
    let kernel = qemu_tls_migrate::vm::workload::workload_kernel(wss_mib, 100).expect("workload");
    let monitor_path = pair.b.qmp_dir().join(format!("{name}.sock"));
    let spec: Vec<(&str, &Path, DiskFormat)> = disks
        .iter()
        .map(|(t, p, f, _, _)| (*t, p.as_path(), *f))
        .collect();
    let xml = fixture::domain_xml(
        &name,
        &spec,
        monitor.then_some(monitor_path.as_path()),
        Some(&kernel),
    );
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, xml).expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8")])
        .await;
    pair.b.virsh_ok(&["start", &name]).await;
    let dest = pair.a.images_dir();
    let disks = disks
        .into_iter()
        .map(|(t, p, _, _, _)| {
            let file = p.file_name().expect("file name").to_owned();
            (t, p, dest.join(file))
        })
        .collect();
    (name, disks)
}

/// The `--dest-xml` file for a [`start_busy_domain`] domain: every disk moved to its
/// destination image.
fn busy_dest_xml(pair: &LibvirtPair, name: &str, disks: &[(&str, PathBuf, PathBuf)]) -> PathBuf {
    let mut xml = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(name))
        .and_then(|d| d.migratable_xml())
        .expect("migratable XML");
    for (target, _, dest) in disks {
        xml = xml.with_disk_file(target, dest).expect("disk path");
    }
    let path = pair.b.dir.path().join(format!("{name}-dest.xml"));
    std::fs::write(&path, xml.as_str()).expect("write XML");
    path
}

/// The agent's command line for a [`start_busy_domain`] domain: its disks named by target.
pub(crate) fn agent_args(name: &str, to: &str, pki: &str, dest_xml: &Path) -> Vec<String> {
    let mut args = served_args(name, to, pki, &dest_xml.display().to_string());
    args.retain(|a| a != "--all-local-disks");
    args.extend(["--disk", "vda", "--disk", "vdb"].map(String::from));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_with_two_local_disks_migrates_through_serve_libvirt_with_nothing_in_clear() {
    let pair = LibvirtPair::shared();
    let (name, disks) = start_busy_domain(&pair, "served", true).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut args = agent_args(&name, &service.addr, &pki_b, &dest_xml);
    args.extend(["-q", "--destroy-source"].map(String::from));
    // Cleartext would show the migration stream's header (magic and version 3), its RAM
    // block's name, or a run of either disk's bytes; the control sends one of them in clear to
    // prove the tap sees it. (The magic alone, 4 bytes, turned up by chance in about one of 16
    // runs' 270 MB of ciphertext.)
    let needles = vec![
        b"QEVM\0\0\0\x03".to_vec(),
        b"pc.ram".to_vec(),
        vec![0x5a; 512],
        vec![0xa5; 512],
    ];
    let control = fixture::LinkCapture::start(&pair.hosts.a, needles.clone());
    fixture::send_in_clear(
        &pair.hosts.b,
        &pair.hosts.a,
        &pair.hosts.a_addr,
        &[0x5a; 4096],
    );
    let control = control.finish();
    let capture = fixture::LinkCapture::start(&pair.hosts.a, needles);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let seen = capture.finish();
    let json = fixture::stdout_json(&out);
    // Shown with --nocapture: the figures the README quotes.
    fixture::show("libvirt domain migration", &json);
    fixture::show("capture", &format!("{seen:?}"));
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transport"], "tls");
    assert_eq!(json["source_qmp"], "declared-monitor");
    assert_eq!(json["warnings"], serde_json::json!([]), "{json}");
    assert_eq!(json["source_end"]["destroyed"], true, "{json}");
    assert_eq!(json["disks"].as_array().map(Vec::len), Some(2), "{json}");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    assert_eq!(
        pair.b.virsh_ok(&["domstate", &name]).await,
        "shut off",
        "--destroy-source stops the source once the destination runs"
    );
    for (target, source, dest) in &disks {
        fixture::images_identical(source, dest).unwrap_or_else(|e| panic!("disk {target}: {e}"));
    }
    assert!(
        control.found[2].1 > 0,
        "the tap sees cleartext: {control:?}"
    );
    assert!(
        seen.bytes > 96 << 20,
        "the tap saw the disks cross the link: {seen:?}"
    );
    assert!(
        seen.found.iter().all(|(_, n)| *n == 0),
        "nothing crossed the link in clear: {seen:?}"
    );
    pair.a.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsecured_source_is_refused_by_a_secured_service_and_nothing_is_made_there() {
    let pair = LibvirtPair::shared();
    let (name, disks) = start_busy_domain(&pair, "unsecured", true).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    let (_lab, service, _pki_b) = libvirt_service(&pair).await;
    let unsecured = tempfile::tempdir().expect("empty PKI dir");
    fixture::open_path_for_others(unsecured.path());
    let unsecured_dir = unsecured.path().display().to_string();
    let args = agent_args(&name, &service.addr, &unsecured_dir, &dest_xml);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    fixture::show("unsecured source", &json);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "mixed-security", "{json}");
    assert_nothing_moved(&pair, &name, &disks).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_whose_libvirtd_is_down_refuses_and_nothing_is_made_there() {
    let pair = LibvirtPair::shared();
    let (name, disks) = start_busy_domain(&pair, "nolibvirtd", true).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    // A libvirtd that stopped leaves no one listening on its socket.
    let gone = pair.a.dir.path().join("stopped-libvirt-sock");
    let uri = format!("qemu+unix:///system?socket={}", gone.display());
    let (_lab, service, pki_b) =
        libvirt_service_on(&pair, &pair.hosts.a_addr, &["--libvirt", "--connect", &uri]).await;
    let args = agent_args(&name, &service.addr, &pki_b, &dest_xml);

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    fixture::show("libvirtd down", &json);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("libvirt")),
        "{json}"
    );
    assert_nothing_moved(&pair, &name, &disks).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// The source domain runs on, and host a has no domain of its name and none of its disks.
async fn assert_nothing_moved(pair: &LibvirtPair, name: &str, disks: &[(&str, PathBuf, PathBuf)]) {
    assert_eq!(pair.b.virsh_ok(&["domstate", name]).await, "running");
    assert!(!pair.a.virsh(&["domstate", name]).await.status.success());
    for (target, _, dest) in disks {
        assert!(
            !dest.exists(),
            "no destination disk {target} at {}",
            dest.display()
        );
    }
}

/// Domain `name` runs on host a and is paused on host b, and each of `disks` has the same
/// content on both hosts (the source is paused, postmigrate: its disks no longer change).
async fn assert_moved(pair: &LibvirtPair, name: &str, disks: &[(&str, PathBuf, PathBuf)]) {
    assert_eq!(pair.a.virsh_ok(&["domstate", name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", name]).await, "paused");
    for (target, source, dest) in disks {
        fixture::images_identical(source, dest).unwrap_or_else(|e| panic!("disk {target}: {e}"));
    }
}

/// Waits until the source domain's own migration is sending RAM (asked through libvirt's
/// monitor, beside the tool's declared one), within 60 s.
pub(crate) async fn wait_ram_phase(pair: &LibvirtPair, name: &str) {
    let seen = source_monitor_says(pair, name, r#"{"execute":"query-migrate"}"#, |v| {
        v["return"]["status"] == "active" && v["return"]["ram"]["transferred"].as_u64() > Some(0)
    })
    .await;
    assert!(seen, "the migration never reached its RAM phase");
}

/// Waits (60 s at most) until host a has no domain `name` and none of the disks.
pub(crate) async fn wait_destination_clean(
    pair: &LibvirtPair,
    name: &str,
    disks: &[(&str, PathBuf, PathBuf)],
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let domain_gone = !pair.a.virsh(&["domstate", name]).await.status.success();
        let disks_gone = disks.iter().all(|(_, _, d)| !d.exists());
        if domain_gone && disks_gone {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "host a still has domain {name} ({domain_gone}) or its disks ({disks_gone})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Migrates a [`start_busy_domain`] domain through `serve --libvirt` listening on `addr`, slow
/// enough to be caught sending RAM, does `interrupt` once it is, and checks what must hold
/// whatever went wrong: the migration failed, the source domain runs on in libvirt's view, and
/// the destination has neither the domain nor the disks the service created for it.
async fn interrupted_during_the_ram_phase(
    pair: &std::sync::Arc<LibvirtPair>,
    what: &str,
    addr: &str,
    interrupt: impl std::future::Future<Output = ()>,
) {
    let (name, disks) = start_busy_domain(pair, what, true).await;
    let dest_xml = busy_dest_xml(pair, &name, &disks);
    let (_lab, service, pki_b) = libvirt_service_on(pair, addr, &["--libvirt"]).await;
    let mut args = agent_args(&name, &service.addr, &pki_b, &dest_xml);
    args.extend(["--max-bandwidth", "8M", "--timeout", "60"].map(String::from));
    let run = {
        let pair = pair.clone();
        tokio::spawn(async move { Cli::new(&args).in_host(&pair.b).output().await })
    };

    wait_ram_phase(pair, &name).await;
    interrupt.await;
    let out = run.await.expect("migration");

    let json = fixture::stdout_json(&out);
    fixture::show(what, &json);
    assert_ne!(out.status.code(), Some(0), "{json}");
    assert_eq!(
        pair.b.virsh_ok(&["domstate", &name]).await,
        "running",
        "{json}"
    );
    wait_destination_clean(pair, &name, &disks).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_domain_destroyed_during_the_ram_phase_leaves_the_source_running() {
    let pair = LibvirtPair::shared();
    let a = pair.clone();
    // The domain's name is only known inside: destroy whatever incoming domain host a runs.
    let destroy = async move {
        let list = a.a.virsh_ok(&["list", "--name"]).await;
        for name in list.lines().filter(|l| l.starts_with("qtm-midway-")) {
            a.a.virsh_ok(&["destroy", name]).await;
        }
    };
    let addr = pair.hosts.a_addr.clone();
    interrupted_during_the_ram_phase(&pair, "midway", &addr, destroy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_during_the_ram_phase_leaves_the_source_running_and_the_service_cleans_up() {
    let pair = LibvirtPair::shared();
    // A link of this test's own, so that cutting it cuts no other test's.
    let link = pair.hosts.extra_link();
    let addr = link.a_addr.clone();
    let cut = async { link.set(false) };
    interrupted_during_the_ram_phase(&pair, "cut", &addr, cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirt_domain_and_a_bare_qemu_of_the_same_size_migrate_side_by_side() {
    let pair = LibvirtPair::shared();
    // The libvirt domain: 128 MiB, our workload dirtying 64 MiB, qcow2 64 MiB + raw 32 MiB.
    let (name, disks) = start_domain_dirtying(&pair, "timed", true, 64).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    let (lab, service, pki_b) = libvirt_service(&pair).await;
    let args = agent_args(&name, &service.addr, &pki_b, &dest_xml);
    // The same VM as bare QEMU processes on the same two hosts and link (the fixture also
    // fills 64 MiB of its RAM, which the workload's 64 MiB mostly overlap).
    let kernel = qemu_tls_migrate::vm::workload::workload_kernel(64, 100).expect("workload");
    let bare = fixture::Pair::builder()
        .on(&pair.hosts)
        .disks(&[("vda", DiskFormat::Qcow2, 64), ("vdb", DiskFormat::Raw, 32)])
        .tweak(|c| c.kernel = Some(kernel))
        .start()
        .await;
    let qmp_dir = fixture::qmp_dir(&bare.dest);
    let pki_a = lab.host("host-a", &["host-a"]);
    let bare_service = fixture::Service::builder(&pki_a, &qmp_dir)
        .on(&pair.hosts)
        .start()
        .await;
    let qmp_name = bare
        .dest
        .qmp_path()
        .file_name()
        .expect("socket name")
        .to_string_lossy()
        .to_string();
    let bare_args = fixture::migrate_to_args(
        &bare,
        &bare_service.addr,
        Path::new(&pki_b),
        &qmp_name,
        &["--disk", "vda", "--disk", "vdb"],
    );

    let domain_out = Cli::new(&args).in_host(&pair.b).output().await;
    let bare_out = Cli::new(&bare_args).in_netns(&pair.hosts.b).output().await;

    let (domain, bare_json) = (
        fixture::stdout_json(&domain_out),
        fixture::stdout_json(&bare_out),
    );
    assert_eq!(domain_out.status.code(), Some(0), "{domain}");
    assert_eq!(bare_out.status.code(), Some(0), "{bare_json}");
    // No timing is asserted (this machine is noisy): the figures are shown for the README.
    for (what, json) in [("libvirt domain", &domain), ("bare QEMU", &bare_json)] {
        fixture::show(
            what,
            &format!(
                "wall {} ms, timing {}, RAM {} bytes, disks {}",
                json["wall_ms"], json["timing"], json["ram"]["bytes"], json["disks"]
            ),
        );
    }
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tool_killed_during_the_ram_phase_leaves_the_service_to_roll_back_on_its_own() {
    let pair = LibvirtPair::shared();
    let (name, disks) = start_busy_domain(&pair, "killed", true).await;
    let dest_xml = busy_dest_xml(&pair, &name, &disks);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut args = agent_args(&name, &service.addr, &pki_b, &dest_xml);
    // RAM takes about 8 s at this rate: the service notices the silent channel (6 s) first.
    args.extend(["--max-bandwidth", "4M"].map(String::from));
    // As the agent does on its timeout: SIGKILL, no chance to clean up.
    let mut tool = Cli::new(&args)
        .in_host(&pair.b)
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the tool");

    wait_ram_phase(&pair, &name).await;
    tool.kill().await.expect("SIGKILL");

    wait_destination_clean(&pair, &name, &disks).await;
    let (uri, domain) = (pair.b.uri(), name.clone());
    let qemu = tokio::task::spawn_blocking(move || {
        let d = Libvirt::connect(&uri).and_then(|l| l.domain(&domain))?;
        let status = d.monitor_command(r#"{"execute":"query-status"}"#)?;
        let migration = d.monitor_command(r#"{"execute":"query-migrate"}"#)?;
        Ok::<_, LibvirtError>((status, migration))
    })
    .await
    .expect("query")
    .expect("source QEMU answers");
    fixture::show("source after the kill", &format!("{qemu:?}"));
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    assert!(qemu.0.contains(r#""status":"running""#), "{qemu:?}");
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_refuses_the_same_uuid_running_there_under_another_name() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "uuid").await;
    let source_xml = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(&name))
        .and_then(|d| d.migratable_xml())
        .expect("XML");
    // The same VM (same UUID) already runs on host a under another name.
    let alias = format!("{name}-renamed");
    let other_disk = pair.a.images_dir().join(format!("{alias}.qcow2"));
    qcow2(&other_disk);
    let other_xml = source_xml
        .with_name(&alias)
        .and_then(|x| x.with_disk_file("vda", &other_disk))
        .and_then(|x| x.with_monitor(&pair.a.qmp_dir().join(format!("{alias}.sock"))))
        .expect("XML");
    let other_path = pair.a.dir.path().join(format!("{alias}.xml"));
    std::fs::write(&other_path, other_xml.as_str()).expect("XML");

    let (json, dest_disk) = refused_as_existing(&pair, &name, &other_path).await;

    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&alias)),
        "{json}"
    );
    assert!(!dest_disk.exists(), "no disk was created");
    assert!(!pair.a.virsh(&["domstate", &name]).await.status.success());
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.a.virsh_ok(&["destroy", &alias]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test]
async fn a_disk_the_domain_does_not_have_is_refused_listing_its_targets() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "nodisk").await;

    let json = refused_by_name(&pair, &name, &["--disk", "vdz"], "unknown-disk").await;

    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("vdz") && message.contains("vda"), "{json}");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// Starts the domain in `other_xml` on host a, then migrates domain `name` from host b through
/// `serve --libvirt`: the migration must be refused as `domain-exists` (exit 3). Returns the
/// JSON result and the destination disk path the source asked for.
async fn refused_as_existing(
    pair: &LibvirtPair,
    name: &str,
    other_xml: &Path,
) -> (serde_json::Value, PathBuf) {
    pair.a
        .virsh_ok(&["create", other_xml.to_str().expect("UTF-8")])
        .await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let (_lab, _service, args) = served_migration(pair, name, &dest_disk).await;

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "domain-exists", "{json}");
    (json, dest_disk)
}

/// The names of the incoming domains' QMP sockets in `dir` now.
fn incoming_sockets(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name())
                .filter(|n| n.to_string_lossy().starts_with("qtm-in-"))
                .collect()
        })
        .unwrap_or_default()
}

/// How the proxy in front of an incoming domain's QMP socket treats `cont`.
#[derive(Clone, Copy, PartialEq)]
enum OnCont {
    /// Its reply is lost.
    LoseReply,
    /// The domain's QEMU is also SIGSTOPped just before `cont` reaches it.
    Freeze,
}

/// Starts the agent's migration of a busy domain through a service whose way to the incoming
/// domain's QEMU goes through a proxy that treats `cont` as `on_cont`; returns the domain,
/// its disks, the migration's output, the proxy and when the QEMU was frozen (if it was).
async fn migrate_through_a_lossy_proxy(
    pair: &LibvirtPair,
    what: &str,
    on_cont: OnCont,
) -> (
    String,
    Vec<(&'static str, PathBuf, PathBuf)>,
    std::process::Output,
    fixture::QmpDelayProxy,
    Arc<Mutex<Option<(u32, std::time::Instant)>>>,
) {
    let (name, disks) = start_busy_domain(pair, what, true).await;
    let dest_xml = busy_dest_xml(pair, &name, &disks);
    let interpose = tempfile::tempdir_in(pair.a.dir.path()).expect("interpose dir");
    let interpose_arg = interpose.path().display().to_string();
    // Sockets of this service's own, so that the watch below sees only this test's domain.
    let sockets = pair.a.dir.path().join(format!("sockets-{name}"));
    let sockets_arg = sockets.display().to_string();
    let extra = [
        "--libvirt",
        "--qmp-interpose-dir",
        &interpose_arg,
        "--libvirt-qmp-dir",
        &sockets_arg,
    ];
    let (_lab, service, pki_b) = libvirt_service_on(pair, &pair.hosts.a_addr, &extra).await;
    let before = incoming_sockets(&sockets);
    let at = interpose.path().to_path_buf();
    let pid_file = pair.a.run_dir().join(format!("libvirt/qemu/{name}.pid"));
    let frozen: Arc<Mutex<Option<(u32, std::time::Instant)>>> = Arc::default();
    let cell = frozen.clone();
    // Puts the proxy in place once the service made the domain's socket.
    let proxy = tokio::spawn(async move {
        let socket = tokio::time::timeout(fixture::EVENT_TIMEOUT, async {
            loop {
                if let Some(new) = incoming_sockets(&sockets)
                    .into_iter()
                    .find(|n| !before.contains(n))
                {
                    return new;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the service makes the incoming domain's socket");
        fixture::QmpDelayProxy::start_with(
            &sockets.join(&socket),
            &at.join(&socket),
            fixture::command_named("cont"),
            fixture::FOREVER,
            move || {
                if on_cont == OnCont::Freeze {
                    let pid = std::fs::read_to_string(&pid_file)
                        .ok()
                        .and_then(|p| p.trim().parse().ok())
                        .expect("the incoming domain's QEMU pid");
                    fixture::signal(pid, nix::sys::signal::Signal::SIGSTOP);
                    *cell.lock().expect("lock") = Some((pid, std::time::Instant::now()));
                }
            },
        )
        .await
    });
    let args = agent_args(&name, &service.addr, &pki_b, &dest_xml);
    let out = Cli::new(&args).in_host(&pair.b).output().await;
    let proxy = proxy.await.expect("proxy");
    drop(interpose);
    (name, disks, out, proxy, frozen)
}

/// `cont`'s reply lost between the service and the incoming domain's QEMU: the service learns
/// from QEMU that the guest runs there, never destroys that domain, and the migration ends
/// with the one copy running on the destination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_to_cont_leaves_the_incoming_domain_running_and_the_source_paused() {
    let pair = LibvirtPair::shared();

    let (name, disks, out, _proxy, _) =
        migrate_through_a_lossy_proxy(&pair, "lossy", OnCont::LoseReply).await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_moved(&pair, &name, &disks).await;
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// The incoming domain's QEMU frozen for 90 s right after `cont` reached it: the tool gives up
/// while it is frozen, the service leaves the domain as it is (never `virsh destroy`), and
/// the source stays paused; once it thaws, the domain is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_domain_frozen_right_after_cont_is_left_alone_and_the_source_stays_paused() {
    let pair = LibvirtPair::shared();

    let (name, _disks, out, proxy, frozen) =
        migrate_through_a_lossy_proxy(&pair, "frozen", OnCont::Freeze).await;
    let source_state = pair.b.virsh_ok(&["domstate", &name]).await;
    let (pid, at) = frozen.lock().expect("lock").expect("the domain was frozen");
    let given_up_after = at.elapsed();
    // The scenario's length, not a wait for an event: the QEMU stays frozen this long.
    tokio::time::sleep(Duration::from_secs(90).saturating_sub(at.elapsed())).await;
    fixture::signal(pid, nix::sys::signal::Signal::SIGCONT);

    let json = fixture::stdout_json(&out);
    fixture::show("gave up after", &format!("{given_up_after:?}"));
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["error"]["kind"], "split-brain-risk", "{json}");
    assert!(
        given_up_after < Duration::from_secs(90),
        "the tool waited for the frozen QEMU"
    );
    assert_eq!(source_state, "paused", "the source must stay paused");
    let after = proxy.commands_after("cont");
    assert!(
        after.iter().all(|c| c == "query-status"),
        "after cont the service sent {after:?}"
    );
    assert!(
        fixture::process_alive(pid),
        "the incoming domain's QEMU was killed"
    );
    let dest_state = pair.a.virsh_ok(&["domstate", &name]).await;
    assert!(
        ["running", "paused"].contains(&dest_state.as_str()),
        "{dest_state}"
    );
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "paused");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// Starts domain `name` on host b, with 16 MiB of data on its disk and the QMP monitor
/// `monitor` if given, and the waiting destination on host a; returns the destination's
/// monitor. Copied at `--disk-bandwidth 2M`, its disk keeps a run busy for some 8 s.
async fn start_slow_to_copy_domain(
    pair: &LibvirtPair,
    name: &str,
    monitor: Option<&Path>,
) -> PathBuf {
    let disk = pair.b.images_dir().join(format!("{name}.qcow2"));
    qcow2(&disk);
    fixture::qemu_io(&disk, DiskFormat::Qcow2, "write -P 0x5a 0 16M");
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(name, &disk, monitor)).expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8 path")])
        .await;
    pair.b.virsh_ok(&["start", name]).await;
    start_waiting_destination(pair, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_is_its_own_job_id_so_jobs_cancel_by_its_name_rolls_back_and_a_second_run_is_busy()
{
    let pair = LibvirtPair::shared();
    // CloudStack's vmName form.
    let name = format!("i-2-{}-VM", domain_name("job"));
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let dest_monitor = start_slow_to_copy_domain(&pair, &name, Some(&monitor)).await;
    let (_lab, pki_a, pki_b) = libvirt_lab();
    let run_dir = tempfile::tempdir().expect("run dir");
    let extra = ["--disk", "vda", "--disk-bandwidth", "2M"];
    let args = by_name_args(&pair, &name, &dest_monitor, (&pki_a, &pki_b), &extra);
    let jobs = run_dir.path().join("jobs");
    let cli = |args: &[String]| Cli::new(args).env("QTM_RUN_DIR", &jobs);
    let first = tokio::spawn(cli(&args).output());
    wait_block_job(&pair, &name).await;

    let second = cli(&args).output().await;
    let cancel = cli(&["jobs".into(), "cancel".into(), name.clone()])
        .output()
        .await;
    let first = first.await.expect("first run");

    let refusal = fixture::stdout_json(&second);
    assert_eq!(second.status.code(), Some(3), "{refusal}");
    assert_eq!(refusal["error"]["kind"], "busy", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&format!("domain {name}")) && message.contains(&format!("job {name}")),
        "{message}"
    );
    assert_eq!(
        cancel.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let report = fixture::stdout_json(&first);
    assert_eq!(first.status.code(), Some(4), "{report}");
    assert_eq!(report["job"], name.as_str(), "{report}");
    assert_eq!(report["status"], "cancelled", "{report}");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.b.virsh_ok(&["destroy", &name]).await;
    pair.a.virsh(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_source_that_fails_is_reported_as_its_own_outcome_with_exit_5() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "nodestroy").await;
    let dest_monitor = start_waiting_destination(&pair, &name);
    let (_lab, pki_a, pki_b) = libvirt_lab();
    // libvirtd's read-only socket: the domain is found and migrates (through its own
    // monitor), and destroying it is forbidden.
    let read_only = format!(
        "qemu+unix:///system?socket={}",
        pair.b.run_dir().join("libvirt/libvirt-sock-ro").display()
    );
    let extra = ["--all-local-disks", "--destroy-source"];
    let mut args = by_name_args(&pair, &name, &dest_monitor, (&pki_a, &pki_b), &extra);
    for a in args.iter_mut().filter(|a| **a == pair.b.uri()) {
        *a = read_only.clone();
    }
    let run_dir = tempfile::tempdir().expect("run dir");

    let out = Cli::new(&args)
        .env("QTM_RUN_DIR", run_dir.path().join("jobs"))
        .output()
        .await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(5), "{json}");
    assert_eq!(json["status"], "completed", "{json}");
    assert_eq!(json["job"], name.as_str(), "{json}");
    let end = &json["source_end"];
    assert_eq!(end["domain"], name.as_str(), "{json}");
    assert_eq!(end["destroyed"], false, "{json}");
    let error = end["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&name) && error.contains("read only"),
        "{json}"
    );
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "paused");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}
