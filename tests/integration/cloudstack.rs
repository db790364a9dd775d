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

use crate::fixture::{self, Cli, LibvirtPair, domain_name};
use crate::libvirt::{libvirt_service, served_args};

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
    create_image(&dest_data, DiskFormat::Qcow2, DATA_MIB << 20).expect("data volume");
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
