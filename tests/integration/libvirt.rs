//! The libvirt layer against real libvirtd 9.0 daemons: two [`LibvirtHost`]s (source `b`,
//! destination `a`), shared by the tests of this file that run at the same time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tls_migrate::libvirt::{DomainXml, Libvirt, LibvirtError, StateKind};
use qemu_tls_migrate::qemu::QueryStatus;
use qemu_tls_migrate::qmp::Qmp;

use crate::fixture::{LibvirtHost, LibvirtPair, domain_name, small_domain_xml};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// An empty qcow2 image of 64 MiB at `path`.
fn qcow2(path: &Path) {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg("64M")
        .output()
        .expect("qemu-img create");
    assert!(out.status.success(), "qemu-img create: {out:?}");
}

/// Defines and starts (with `virsh`, inside `host`) a small domain with a qcow2 disk and a QMP
/// monitor declared in `<qemu:commandline>`; returns its name and monitor path.
async fn start_domain(host: &LibvirtHost, what: &str) -> (String, PathBuf) {
    let name = domain_name(what);
    let disk = host.images_dir().join(format!("{name}.qcow2"));
    qcow2(&disk);
    let monitor = host.qmp_dir().join(format!("{name}.sock"));
    let xml_path = host.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(&name, &disk, Some(&monitor))).expect("XML");
    let xml_arg = xml_path.to_str().expect("UTF-8 path");
    host.virsh_ok(&["define", xml_arg]).await;
    host.virsh_ok(&["start", &name]).await;
    (name, monitor)
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
    drop(qmp);

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

    let version = pair.a.run_cli(&["--version"]).await;
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
    let xml = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(&name))
        .and_then(|d| d.migratable_xml())
        .expect("migratable XML");
    // The destination as `serve --libvirt` is to make it: the same XML, its own empty disk and
    // monitor, started paused and waiting with -incoming defer.
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    qcow2(&dest_disk);
    let dest_monitor = pair.a.qmp_dir().join(format!("{name}-in.sock"));
    let dest_xml = xml
        .with_disk_file("vda", &dest_disk)
        .and_then(|x| x.with_monitor(&dest_monitor))
        .and_then(|x| x.with_qemu_args(&["-incoming", "defer"]))
        .expect("destination XML");
    Libvirt::connect(&pair.a.uri())
        .and_then(|l| l.create_paused(&dest_xml))
        .expect("destination domain");
    let lab = crate::fixture::Lab::new("Test CA");
    let (pki_a, pki_b) = (
        lab.host("host-a", &["host-a"]),
        lab.host("host-b", &["host-b"]),
    );
    crate::fixture::open_path_for_others(&pki_a);
    let (b_uri, a_monitor) = (pair.b.uri(), dest_monitor.display().to_string());
    let (pki_a, pki_b) = (pki_a.display().to_string(), pki_b.display().to_string());

    let out = crate::fixture::run_cli(&[
        "migrate",
        "--json",
        "--domain",
        &name,
        "--connect",
        &b_uri,
        "--dest-qmp",
        &a_monitor,
        "--dest-host",
        "host-a",
        "--dest-address",
        &pair.hosts.a_addr,
        "--source-pki-dir",
        &pki_b,
        "--dest-pki-dir",
        &pki_a,
        "--all-local-disks",
    ])
    .await;

    let json = crate::fixture::stdout_json(&out);
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
    let uri = pair.b.uri();

    let out = crate::fixture::run_cli(&[
        "migrate",
        "--json",
        "--domain",
        "qtm-no-such-domain",
        "--connect",
        &uri,
        "--dest-qmp",
        "/nonexistent.sock",
        "--dest-host",
        "host-a",
    ])
    .await;

    let json = crate::fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "no-such-domain", "{json}");
}

/// The source domain's migratable XML with its disk moved to `disk`: what the CloudStack agent
/// passes as `--dest-xml`. Written to a file in `dir`.
fn dest_xml_file(pair: &LibvirtPair, name: &str, disk: &Path) -> PathBuf {
    let xml = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(name))
        .and_then(|d| d.migratable_xml())
        .and_then(|x| x.with_disk_file("vda", disk))
        .expect("destination XML");
    let path = pair.b.dir.path().join(format!("{name}-dest.xml"));
    std::fs::write(&path, xml.as_str()).expect("write XML");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_migrates_through_serve_libvirt_which_makes_the_incoming_domain_and_its_disk() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "served").await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let dest_xml = dest_xml_file(&pair, &name, &dest_disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut args = served_args(
        &name,
        &service.addr,
        &pki_b,
        &dest_xml.display().to_string(),
    );
    args.extend(["-q".to_string(), "--destroy-source".to_string()]);

    let out = pair.b.run_cli(&crate::fixture::strs(&args)).await;

    let json = crate::fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["transport"], "tls");
    assert_eq!(json["warnings"], serde_json::json!([]), "{json}");
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
    assert!(
        dest_disk.exists(),
        "the service created the destination disk"
    );
    pair.a.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_creates_the_overlay_on_its_own_template_copy_for_a_top_only_copy() {
    let pair = LibvirtPair::shared();
    let name = domain_name("overlay");
    // The template under the same name in each host's pool, the VM's disk an overlay on it.
    let template_name = format!("{name}-template.raw");
    let (src_template, dst_template) = (
        pair.b.images_dir().join(&template_name),
        pair.a.images_dir().join(&template_name),
    );
    qemu_tls_migrate::vm::create_image(
        &src_template,
        qemu_tls_migrate::vm::DiskFormat::Raw,
        64 << 20,
    )
    .expect("template");
    crate::fixture::qemu_io(
        &src_template,
        qemu_tls_migrate::vm::DiskFormat::Raw,
        "write -P 0x11 0 64M",
    );
    std::fs::copy(&src_template, &dst_template).expect("template copy on the destination");
    let disk = pair.b.images_dir().join(format!("{name}.qcow2"));
    crate::fixture::create_overlay(&disk, &src_template);
    crate::fixture::qemu_io(
        &disk,
        qemu_tls_migrate::vm::DiskFormat::Qcow2,
        "write -P 0x22 1M 4M",
    );
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(&name, &disk, Some(&monitor))).expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8 path")])
        .await;
    pair.b.virsh_ok(&["start", &name]).await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let dest_xml = dest_xml_file(&pair, &name, &dest_disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut args = served_args(
        &name,
        &service.addr,
        &pki_b,
        &dest_xml.display().to_string(),
    );
    args.extend(["--disk-copy".to_string(), "top".to_string()]);

    let out = pair.b.run_cli(&crate::fixture::strs(&args)).await;

    let json = crate::fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(json["disks"][0]["copy"], "top", "{json}");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&dest_disk)
        .output()
        .expect("qemu-img info");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("JSON");
    assert_eq!(
        info["backing-filename"].as_str(),
        dst_template.to_str(),
        "the destination's overlay sits on the destination's own template"
    );
    let dest_qmp = Qmp::connect(&pair.a.qmp_dir().join(format!("{name}.sock")), QMP_TIMEOUT)
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
    crate::fixture::images_identical(&disk, &dest_disk).expect("same content through the chain");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_libvirt_refuses_an_existing_disk_path_and_leaves_no_domain() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "taken").await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    std::fs::write(&dest_disk, b"someone else's data").expect("existing file");
    let dest_xml = dest_xml_file(&pair, &name, &dest_disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let args = served_args(
        &name,
        &service.addr,
        &pki_b,
        &dest_xml.display().to_string(),
    );

    let out = pair.b.run_cli(&crate::fixture::strs(&args)).await;

    let json = crate::fixture::stdout_json(&out);
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

/// A lab PKI and `serve --libvirt` on host a (its QMP directory, its libvirtd); returns the
/// lab (kept alive by the caller), the service and host b's PKI directory.
async fn libvirt_service(
    pair: &LibvirtPair,
) -> (crate::fixture::Lab, crate::fixture::Service, String) {
    let lab = crate::fixture::Lab::new("Test CA");
    let (pki_a, pki_b) = (
        lab.host("host-a", &["host-a"]),
        lab.host("host-b", &["host-b"]),
    );
    crate::fixture::open_path_for_others(&pki_a);
    let service = crate::fixture::Service::start_in_libvirt_host(
        &pair.a,
        &pair.hosts.a_addr,
        &pki_a,
        &pair.a.qmp_dir(),
        &["--libvirt"],
    )
    .await;
    (lab, service, pki_b.display().to_string())
}

/// A `migrate --domain NAME --to SERVICE` command line with `--dest-xml` and disk copy.
fn served_args(name: &str, service: &str, pki: &str, dest_xml: &str) -> Vec<String> {
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
    pair.a
        .virsh_ok(&["create", other_xml.to_str().expect("UTF-8")])
        .await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let dest_xml = dest_xml_file(&pair, &name, &dest_disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let args = served_args(
        &name,
        &service.addr,
        &pki_b,
        &dest_xml.display().to_string(),
    );

    let out = pair.b.run_cli(&crate::fixture::strs(&args)).await;

    let json = crate::fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "domain-exists", "{json}");
    assert!(!dest_disk.exists(), "no disk was created");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &name]).await, "running");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_domain_destroyed_mid_way_leaves_the_source_running_and_nothing_there() {
    let pair = LibvirtPair::shared();
    let name = crate::fixture::domain_name("midway");
    let disk = pair.b.images_dir().join(format!("{name}.qcow2"));
    qcow2(&disk);
    crate::fixture::qemu_io(
        &disk,
        qemu_tls_migrate::vm::DiskFormat::Qcow2,
        "write -P 0x5a 0 64M",
    );
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(&xml_path, small_domain_xml(&name, &disk, Some(&monitor))).expect("XML");
    let xml_arg = xml_path.to_str().expect("UTF-8");
    pair.b.virsh_ok(&["define", xml_arg]).await;
    pair.b.virsh_ok(&["start", &name]).await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let dest_xml = dest_xml_file(&pair, &name, &dest_disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let args = served_args(
        &name,
        &service.addr,
        &pki_b,
        &dest_xml.display().to_string(),
    );
    let a_uri = pair.a.uri();
    let killer_name = name.clone();
    // Destroys the incoming domain the moment the service has made it.
    let killer = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let libvirt = Libvirt::connect(&a_uri).expect("connect a");
        while std::time::Instant::now() < deadline {
            // Once libvirt has it up (paused by the user's request: reason 1), not while it
            // is still "starting up" (reason 11), which libvirt also shows as paused.
            if let Ok(d) = libvirt.domain(&killer_name)
                && d.state()
                    .is_ok_and(|s| s.kind == StateKind::Paused && s.reason == 1)
                && d.destroy().is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    });

    let out = pair.b.run_cli(&crate::fixture::strs(&args)).await;

    let json = crate::fixture::stdout_json(&out);
    assert!(
        killer.await.expect("killer"),
        "the incoming domain never appeared: {json}"
    );
    assert_ne!(out.status.code(), Some(0), "{json}");
    assert_eq!(
        pair.b.virsh_ok(&["domstate", &name]).await,
        "running",
        "{json}"
    );
    assert!(!pair.a.virsh(&["domstate", &name]).await.status.success());
    assert!(!dest_disk.exists(), "the created disk was deleted");
    pair.b.virsh_ok(&["destroy", &name]).await;
}
