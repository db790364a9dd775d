//! CloudStack's hosts as they are (issue 20), against the two libvirtds of
//! [`crate::libvirt`]: a domain shaped as CloudStack's agent defines one, its root disk a
//! linked clone (a qcow2 overlay on a template both hosts have), its data disk a full clone,
//! migrated onto the volumes CloudStack's management server creates on the destination
//! beforehand (`--adopt-dest-disks`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use qemu_tls_migrate::vm::{DiskFormat, create_image};

use crate::fixture::{self, Cli, LibvirtHost, LibvirtPair, Service, domain_name};
use crate::libvirt::{libvirt_lab, libvirt_service, served_args, wait_block_job};

/// Size of the template and so of the root disk.
const ROOT_MIB: u64 = 32;
/// Size of the data disk.
const DATA_MIB: u64 = 16;
/// How long qemu-nbd may take to open its image.
const NBD_READY: Duration = Duration::from_secs(10);

/// A CloudStack-shaped VM running on host b, and the volumes made for it on host a.
struct CloudStackVm {
    name: String,
    /// Source disks (root overlay, data), on host b.
    root: PathBuf,
    data: PathBuf,
    /// The destination's volumes, made as the management server makes them, on host a.
    dest_root: PathBuf,
    dest_data: PathBuf,
    dest_xml: PathBuf,
}

/// Starts the VM on host b (a template of [`ROOT_MIB`] in both pools, the root disk an
/// overlay on b's with 2 MiB of its own, a data disk of [`DATA_MIB`] with 8 MiB written) and
/// makes its destination volumes on host a: `qemu-img create` of an overlay on a's template
/// copy, an empty qcow2 of the data disk's size; `--dest-xml` points at them.
async fn start_cloudstack_vm(pair: &LibvirtPair, what: &str) -> CloudStackVm {
    start_cloudstack_vm_sized(pair, what, DATA_MIB).await
}

/// [`start_cloudstack_vm`] with a data volume of `dest_data_mib` on host a (a smaller one
/// than the source's disk: a volume that must grow).
async fn start_cloudstack_vm_sized(
    pair: &LibvirtPair,
    what: &str,
    dest_data_mib: u64,
) -> CloudStackVm {
    let name = domain_name(what);
    let template = format!("{name}-template.raw");
    for dir in [pair.b.images_dir(), pair.a.images_dir()] {
        let path = dir.join(&template);
        create_image(&path, DiskFormat::Raw, ROOT_MIB << 20).expect("template");
        fixture::qemu_io(&path, DiskFormat::Raw, "write -P 0x11 0 4M");
    }
    let images = pair.b.images_dir();
    let (root, data) = (
        images.join(format!("{name}-root.qcow2")),
        images.join(format!("{name}-data.qcow2")),
    );
    fixture::create_overlay(&root, &images.join(&template));
    fixture::qemu_io(&root, DiskFormat::Qcow2, "write -P 0x22 1M 2M");
    create_image(&data, DiskFormat::Qcow2, DATA_MIB << 20).expect("data disk");
    fixture::qemu_io(&data, DiskFormat::Qcow2, "write -P 0x33 0 8M");
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    let xml =
        fixture::cloudstack_domain_xml_with_data(&name, &root, &data, &monitor, pair.bridge());
    std::fs::write(&xml_path, xml).expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8")])
        .await;
    pair.b.virsh_ok(&["start", &name]).await;

    let dest = pair.a.images_dir();
    let (dest_root, dest_data) = (
        dest.join(format!("{name}-root-dest.qcow2")),
        dest.join(format!("{name}-data-dest.qcow2")),
    );
    fixture::create_overlay(&dest_root, &dest.join(&template));
    create_image(&dest_data, DiskFormat::Qcow2, dest_data_mib << 20).expect("data volume");
    let migratable = qemu_tls_migrate::libvirt::Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(&name))
        .and_then(|d| d.migratable_xml())
        .and_then(|x| x.with_disk_file("vda", &dest_root))
        .and_then(|x| x.with_disk_file("vdb", &dest_data))
        .expect("destination XML");
    let dest_xml = pair.b.dir.path().join(format!("{name}-dest.xml"));
    std::fs::write(&dest_xml, migratable.as_str()).expect("write XML");
    CloudStackVm {
        name,
        root,
        data,
        dest_root,
        dest_data,
        dest_xml,
    }
}

/// The agent's command line for `vm`: root disk copied top-only, data disk whole, onto the
/// volumes made for them.
fn adopting_args(vm: &CloudStackVm, service: &str, pki: &str) -> Vec<String> {
    let mut args = served_args(&vm.name, service, pki, &vm.dest_xml.display().to_string());
    args.retain(|a| a != "--all-local-disks");
    args.extend(
        [
            "--disk",
            "vda,copy=top",
            "--disk",
            "vdb",
            "--adopt-dest-disks",
            "--destroy-source",
        ]
        .map(String::from),
    );
    args
}

/// Device and inode of `path`.
fn identity(path: &Path) -> (u64, u64) {
    let meta = std::fs::metadata(path).expect("the volume");
    (meta.dev(), meta.ino())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudstack_vm_migrates_onto_the_volumes_made_for_it_which_keep_their_inodes() {
    let pair = LibvirtPair::shared();
    let vm = start_cloudstack_vm(&pair, "csadopt").await;
    let before = (identity(&vm.dest_root), identity(&vm.dest_data));
    let (_lab, service, pki) = libvirt_service(&pair).await;

    let out = Cli::new(adopting_args(&vm, &service.addr, &pki))
        .in_host(&pair.b)
        .output()
        .await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &vm.name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &vm.name]).await, "shut off");
    pair.a.virsh_ok(&["destroy", &vm.name]).await;
    assert_eq!(
        (identity(&vm.dest_root), identity(&vm.dest_data)),
        before,
        "the same files, not replaced"
    );
    assert_eq!(
        fixture::image_info(&vm.dest_root)["backing-filename"].as_str(),
        pair.a
            .images_dir()
            .join(format!("{}-template.raw", vm.name))
            .to_str(),
        "the root volume still sits on the destination's template"
    );
    fixture::images_identical(&vm.root, &vm.dest_root).expect("root disk equal");
    fixture::images_identical(&vm.data, &vm.dest_data).expect("data disk equal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_volume_is_refused_untouched_and_grown_in_place_with_create_dest_disks() {
    let pair = LibvirtPair::shared();
    let vm = start_cloudstack_vm_sized(&pair, "csgrow", DATA_MIB / 2).await;
    let before = identity(&vm.dest_data);
    let (_lab, service, pki) = libvirt_service(&pair).await;
    let args = adopting_args(&vm, &service.addr, &pki);

    let refused = Cli::new(args.clone()).in_host(&pair.b).output().await;
    let refused_json = fixture::stdout_json(&refused);
    let refused_size = fixture::image_info(&vm.dest_data)["virtual-size"].as_u64();
    let grown = Cli::new(
        args.iter()
            .map(String::as_str)
            .chain(["--create-dest-disks"]),
    )
    .in_host(&pair.b)
    .output()
    .await;

    assert_ne!(refused.status.code(), Some(0), "{refused_json}");
    let error = refused_json["error"].to_string();
    assert!(
        error.contains(&vm.dest_data.display().to_string())
            && error.contains(&((DATA_MIB / 2) << 20).to_string()),
        "the refusal names the volume and its size: {error}"
    );
    assert_eq!(refused_size, Some((DATA_MIB / 2) << 20), "left as it was");
    let json = fixture::stdout_json(&grown);
    assert_eq!(grown.status.code(), Some(0), "{json}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &vm.name]).await, "running");
    pair.a.virsh_ok(&["destroy", &vm.name]).await;
    assert_eq!(
        identity(&vm.dest_data),
        before,
        "grown in place, not replaced"
    );
    assert_eq!(
        fixture::image_info(&vm.dest_data)["virtual-size"].as_u64(),
        Some(DATA_MIB << 20)
    );
    fixture::images_identical(&vm.data, &vm.dest_data).expect("data disk equal");
}

/// `qemu-nbd` serving `image` (holding it open and locked, as another QEMU would), once it
/// has opened it: its socket is there.
async fn hold_with_qemu_nbd(image: &Path, socket: &Path) -> tokio::process::Child {
    let child = tokio::process::Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-k"])
        .arg(socket)
        .arg(image)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-nbd");
    tokio::time::timeout(NBD_READY, async {
        while !socket.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("qemu-nbd listening");
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_held_by_another_qemu_is_refused_untouched_and_the_adopted_root_volume_stays() {
    let pair = LibvirtPair::shared();
    let vm = start_cloudstack_vm(&pair, "csheld").await;
    let socket = pair.a.dir.path().join(format!("{}-nbd.sock", vm.name));
    let mut nbd = hold_with_qemu_nbd(&vm.dest_data, &socket).await;
    let nbd_pid = nbd.id().expect("qemu-nbd's pid");
    let (root_before, data_before) = (identity(&vm.dest_root), identity(&vm.dest_data));
    let data_bytes = std::fs::read(&vm.dest_data).expect("data volume");
    let (_lab, service, pki) = libvirt_service(&pair).await;

    let out = Cli::new(adopting_args(&vm, &service.addr, &pki))
        .in_host(&pair.b)
        .output()
        .await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(3), "{json}");
    assert_eq!(json["error"]["kind"], "destination-disk", "{json}");
    let message = json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&vm.dest_data.display().to_string())
            && message.contains(&format!("pid {nbd_pid}")),
        "names the volume and who holds it: {message}"
    );
    assert_eq!(pair.b.virsh_ok(&["domstate", &vm.name]).await, "running");
    assert!(!pair.a.virsh(&["domstate", &vm.name]).await.status.success());
    assert_eq!(identity(&vm.dest_data), data_before);
    assert_eq!(
        std::fs::read(&vm.dest_data).expect("data volume"),
        data_bytes,
        "the held volume is untouched"
    );
    assert_eq!(
        identity(&vm.dest_root),
        root_before,
        "the root volume adopted before the refusal is left in place by the roll-back"
    );
    nbd.kill().await.expect("stop qemu-nbd");
    pair.b.virsh_ok(&["destroy", &vm.name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_cancelled_while_copying_leaves_both_adopted_volumes_in_place() {
    let pair = LibvirtPair::shared();
    let vm = start_cloudstack_vm(&pair, "cscancel").await;
    let before = (identity(&vm.dest_root), identity(&vm.dest_data));
    let (_lab, service, pki) = libvirt_service(&pair).await;
    let mut args = adopting_args(&vm, &service.addr, &pki);
    // 10 MiB to copy at 2 MiB/s: the copy is caught running.
    args.extend(["--disk-bandwidth", "2M"].map(String::from));
    let run_dir = tempfile::tempdir().expect("run dir");
    // Made by the tool, mode 0700.
    let jobs = run_dir.path().join("jobs");
    let run = {
        let (pair, jobs) = (pair.clone(), jobs.clone());
        tokio::spawn(async move {
            Cli::new(args)
                .env("QTM_RUN_DIR", jobs)
                .in_host(&pair.b)
                .output()
                .await
        })
    };
    wait_block_job(&pair, &vm.name).await;

    let cancel = Cli::new(["jobs", "cancel", vm.name.as_str()])
        .env("QTM_RUN_DIR", &jobs)
        .in_host(&pair.b)
        .output()
        .await;
    let out = run.await.expect("the migration");

    assert_eq!(
        cancel.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(4), "{json}");
    assert_eq!(pair.b.virsh_ok(&["domstate", &vm.name]).await, "running");
    assert!(!pair.a.virsh(&["domstate", &vm.name]).await.status.success());
    assert_eq!(
        (identity(&vm.dest_root), identity(&vm.dest_data)),
        before,
        "the roll-back deletes no adopted volume"
    );
    pair.b.virsh_ok(&["destroy", &vm.name]).await;
}

/// `serve --libvirt` on `host` (listening on `addr`) with the PKI directory `pki`.
async fn service_on(host: &LibvirtHost, addr: &str, pki: &Path) -> Service {
    Service::builder(pki, &host.qmp_dir())
        .in_host(host)
        .listen(addr)
        .args(&["--libvirt"])
        .start()
        .await
}

/// Domain `name`'s migratable XML on `host` with `vda` and `vdb` moved to `disks`: the
/// `--dest-xml` file for a migration from there.
fn moved_xml(host: &LibvirtHost, name: &str, disks: [&Path; 2], tag: &str) -> PathBuf {
    let xml = qemu_tls_migrate::libvirt::Libvirt::connect(&host.uri())
        .and_then(|l| l.domain(name))
        .and_then(|d| d.migratable_xml())
        .and_then(|x| x.with_disk_file("vda", disks[0]))
        .and_then(|x| x.with_disk_file("vdb", disks[1]))
        .expect("destination XML");
    let path = host.dir.path().join(format!("{name}-{tag}.xml"));
    std::fs::write(&path, xml.as_str()).expect("write XML");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_moved_there_and_back_by_the_tool_then_moves_with_libvirts_own_tls_migration() {
    let pair = LibvirtPair::shared();
    let vm = start_cloudstack_vm(&pair, "csround").await;
    let (_lab, pki_a, pki_b) = libvirt_lab();
    fixture::open_path_for_others(&pki_b);
    let service_a = service_on(&pair.a, &pair.hosts.a_addr, &pki_a).await;
    let service_b = service_on(&pair.b, &pair.hosts.b_addr, &pki_b).await;
    let back = pair.b.images_dir();
    let (back_root, back_data) = (
        back.join(format!("{}-root-back.qcow2", vm.name)),
        back.join(format!("{}-data-back.qcow2", vm.name)),
    );
    pair.a.install_migrate_tls(&pki_a);
    pair.b.install_migrate_tls(&pki_b);

    // b -> a by the tool, onto the volumes made for it.
    let there = Cli::new(adopting_args(
        &vm,
        &service_a.addr,
        &pki_b.display().to_string(),
    ))
    .in_host(&pair.b)
    .output()
    .await;
    // a -> b by the tool, the service making the disks (the root one on b's template).
    let back_xml = moved_xml(&pair.a, &vm.name, [&back_root, &back_data], "back");
    let mut back_args = served_args(
        &vm.name,
        &service_b.addr,
        &pki_a.display().to_string(),
        &back_xml.display().to_string(),
    );
    back_args.retain(|a| a != "--all-local-disks");
    let host = back_args
        .iter()
        .position(|a| a == "--dest-host")
        .expect("--dest-host")
        + 1;
    back_args[host] = "host-b".into();
    back_args.extend(
        [
            "--disk",
            "vda,copy=top",
            "--disk",
            "vdb",
            "--destroy-source",
        ]
        .map(String::from),
    );

    let back = Cli::new(back_args).in_host(&pair.a).output().await;
    // b -> a by libvirt itself, as CloudStack's agent migrates (its disks on storage both
    // hosts reach in this test: /tmp is the same on both, hence --unsafe).
    let a_uri = format!("qemu+tcp://{}/system", pair.hosts.a_addr);
    let migrate_uri = format!("tcp://{}", pair.hosts.a_addr);
    let by_libvirt = pair
        .b
        .virsh(&[
            "migrate",
            "--live",
            "--p2p",
            "--tls",
            "--tls-destination",
            "host-a",
            "--unsafe",
            "--migrateuri",
            &migrate_uri,
            &vm.name,
            &a_uri,
        ])
        .await;

    let json = fixture::stdout_json(&there);
    assert_eq!(there.status.code(), Some(0), "b -> a: {json}");
    let json = fixture::stdout_json(&back);
    assert_eq!(back.status.code(), Some(0), "a -> b: {json}");
    assert!(
        by_libvirt.status.success(),
        "virsh migrate: {}",
        String::from_utf8_lossy(&by_libvirt.stderr)
    );
    assert_eq!(pair.a.virsh_ok(&["domstate", &vm.name]).await, "running");
    assert_eq!(pair.b.virsh_ok(&["domstate", &vm.name]).await, "shut off");
    let live = pair.a.virsh_ok(&["dumpxml", &vm.name]).await;
    let persistent = pair.b.virsh_ok(&["dumpxml", "--inactive", &vm.name]).await;
    // Nothing of the tool's is left: the persistent definition on b is the one the VM was
    // defined with; the running domain the service on b brought in kept its `-qmp` and
    // `-incoming defer` (libvirt cannot change a running domain's arguments), and host a's
    // libvirt hook (`host libvirt-hook`) took them out of the XML libvirt's own migration
    // brought in.
    assert!(
        !live.contains("qtm-in-") && !live.contains("-incoming"),
        "host a's live XML after virsh migrate: {live}"
    );
    assert!(
        !persistent.contains("qtm-in-") && !persistent.contains("-incoming"),
        "{persistent}"
    );
    pair.a.virsh_ok(&["destroy", &vm.name]).await;
    fixture::images_identical(&vm.root, &back_root).expect("root disk equal");
    fixture::images_identical(&vm.data, &back_data).expect("data disk equal");
}
