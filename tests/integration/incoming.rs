//! `serve --libvirt` against real libvirtd 9.0 (the shared [`LibvirtPair`]): what a source may
//! not make the destination run or write (each refused with nothing made there), that a
//! CloudStack-shaped domain still migrates through the allow-list, who holds a QMP socket, and
//! a service killed while an incoming domain waits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use qemu_tls_migrate::libvirt::Libvirt;
use qemu_tls_migrate::peer::{Authz, DestPlan, ErrorKind, Message, NewDisk};

use crate::fixture::{self, Cli, LibvirtPair, PeerClient, Service, domain_name};
use crate::libvirt::{
    dest_xml_file, libvirt_service, libvirt_service_on, served_args, served_migration,
    start_domain, wait_destination_clean,
};

/// The disk a source asks the service to create for a [`start_domain`] domain: its qcow2
/// `vda` of 64 MiB.
fn vda() -> Vec<NewDisk> {
    vec![NewDisk {
        target: "vda".into(),
        format: "qcow2".into(),
        size: 64 << 20,
        backing: None,
        adopt: false,
        grow: false,
    }]
}

/// Domain `name`'s migratable XML on host b with `vda` moved to `disk`: what `--dest-xml`
/// carries.
fn dest_xml(pair: &LibvirtPair, name: &str, disk: &Path) -> String {
    std::fs::read_to_string(dest_xml_file(pair, name, disk)).expect("XML")
}

/// Asks the service at `addr` (from host b, with `pki`) to start the incoming domain `xml`.
async fn start_domain_request(pair: &LibvirtPair, addr: &str, pki: &str, xml: String) -> Message {
    let mut client = PeerClient::connect(&pair.hosts, addr, Path::new(pki)).await;
    client.ask(Message::StartDomain { xml, disks: vda() }).await
}

/// The refusal a `bad-request` must be: nothing changed, naming `what`, not echoing the XML.
fn assert_bad_request(reply: &Message, what: &str) {
    let Message::Error {
        kind,
        message,
        refusal,
    } = reply
    else {
        panic!("refused: {reply:?}");
    };
    assert_eq!(*kind, ErrorKind::BadRequest, "{message}");
    assert!(*refusal, "{message}");
    assert!(message.contains(what), "{what}: {message}");
    assert!(!message.contains("<devices>"), "{message}");
}

/// Host a has no domain `name` and no file at `disk`.
async fn assert_nothing_made(pair: &LibvirtPair, name: &str, disk: &Path) {
    assert!(
        !pair.a.virsh(&["domstate", name]).await.status.success(),
        "host a has no domain {name}"
    );
    assert!(!disk.exists(), "no disk at {}", disk.display());
}

/// Each construct that would let a source run what it likes on the destination, and what the
/// refusal names (spliced into the source domain's real migratable XML; `{EMULATOR}` stands for
/// the test domains' emulator, [`fixture::emulator`]).
const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "<devices>",
        "<devices><hostdev mode='subsystem' type='pci' managed='yes'><source><address \
         domain='0x0000' bus='0x00' slot='0x1f' function='0x0'/></source></hostdev>",
        "hostdev",
    ),
    (
        "<devices>",
        "<devices><filesystem type='mount' accessmode='passthrough'><source dir='/'/>\
         <target dir='host'/></filesystem>",
        "filesystem",
    ),
    (
        "<devices>",
        "<devices><disk type='block' device='disk'><source dev='/dev/sda'/>\
         <target dev='vdz' bus='virtio'/></disk>",
        "block",
    ),
    (
        "</domain>",
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>\
         </domain>",
        "seclabel",
    ),
    (
        "</domain>",
        "<qemu:capabilities><qemu:add capability='blockdev'/></qemu:capabilities></domain>",
        "capabilities",
    ),
    (
        "</domain>",
        "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity></domain>",
        "launchSecurity",
    ),
    (
        "</domain>",
        "<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo></domain>",
        "fwcfg",
    ),
    ("<os>", "<os><kernel>/etc/passwd</kernel>", "kernel"),
    (
        "<emulator>{EMULATOR}</emulator>",
        "<emulator>/bin/sh</emulator>",
        "/bin/sh",
    ),
    (
        "</qemu:commandline>",
        "<qemu:arg value='-device'/><qemu:arg value='virtio-9p-pci'/></qemu:commandline>",
        "-device",
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_forbidden_construct_is_refused_by_the_service_and_nothing_is_made_there() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "forbid").await;
    let disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let base = dest_xml(&pair, &name, &disk);
    let (_lab, service, pki_b) = libvirt_service(&pair).await;

    let emulator = fixture::emulator().display().to_string();
    for (from, to, what) in FORBIDDEN {
        let from = from.replace("{EMULATOR}", &emulator);
        assert!(base.contains(&from), "the source's XML has {from}");
        let xml = base.replacen(&from, to, 1);

        let reply = start_domain_request(&pair, &service.addr, &pki_b, xml).await;

        assert_bad_request(&reply, what);
        assert_nothing_made(&pair, &name, &disk).await;
    }
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chardev_file_or_a_network_monitor_never_reaches_a_qemu_command_line() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "chardev").await;
    let disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let base = dest_xml(&pair, &name, &disk);
    let marker = pair.a.dir.path().join(format!("{name}-chardev.log"));
    let chardev = base.replacen(
        "</qemu:commandline>",
        &format!(
            "<qemu:arg value='-chardev'/><qemu:arg value='file,id=qtmx,path={}'/>\
             </qemu:commandline>",
            marker.display()
        ),
        1,
    );
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let network = base.replacen(
        &format!("unix:{},server=on,wait=off", monitor.display()),
        "tcp:0.0.0.0:4444,server=on,wait=off",
        1,
    );
    assert_ne!(network, base, "the source declares its monitor");
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut first = PeerClient::connect(&pair.hosts, &service.addr, Path::new(&pki_b)).await;
    let mut second = PeerClient::connect(&pair.hosts, &service.addr, Path::new(&pki_b)).await;

    // Both sessions stay open: a domain made for either would still be there.
    let chardev_reply = first
        .ask(Message::StartDomain {
            xml: chardev,
            disks: vda(),
        })
        .await;
    let network_reply = second
        .ask(Message::StartDomain {
            xml: network,
            disks: vda(),
        })
        .await;
    let command_lines: Vec<String> = fixture::all_qemu_pids()
        .into_iter()
        .map(fixture::cmdline)
        .collect();

    assert_bad_request(&chardev_reply, "-chardev");
    assert_bad_request(&network_reply, "tcp:0.0.0.0:4444");
    let marker_text = marker.display().to_string();
    for line in &command_lines {
        assert!(!line.contains(&marker_text), "{line}");
        assert!(!line.contains("tcp:0.0.0.0:4444"), "{line}");
    }
    assert!(!marker.exists());
    assert_nothing_made(&pair, &name, &disk).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_outside_the_storage_dirs_directly_through_dotdot_or_a_symlink_is_refused() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "escape").await;
    let outside = pair.a.dir.path().join(format!("outside-{name}"));
    std::fs::create_dir(&outside).expect("a directory outside the storage dir");
    let link = pair.a.images_dir().join(format!("{name}-link"));
    std::os::unix::fs::symlink(&outside, &link).expect("symlink into it");
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let paths = [
        outside.join("direct.qcow2"),
        pair.a
            .images_dir()
            .join(format!("../outside-{name}/dotdot.qcow2")),
        link.join("through-link.qcow2"),
    ];

    for path in &paths {
        let reply =
            start_domain_request(&pair, &service.addr, &pki_b, dest_xml(&pair, &name, path)).await;

        assert_bad_request(&reply, "--storage-dir");
    }
    let written: Vec<PathBuf> = std::fs::read_dir(&outside)
        .expect("list")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(written, Vec::<PathBuf>::new());
    assert!(!pair.a.virsh(&["domstate", &name]).await.status.success());
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sessions_naming_one_disk_path_one_wins_and_the_other_is_refused() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "race").await;
    let disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let xml = dest_xml(&pair, &name, &disk);
    // Another VM (another name and UUID) whose XML names the same disk path.
    let uuid = Libvirt::connect(&pair.b.uri())
        .and_then(|l| l.domain(&name))
        .and_then(|d| d.uuid())
        .expect("uuid");
    let other_name = format!("{name}-other");
    let other = xml
        .replace(
            &format!("<name>{name}</name>"),
            &format!("<name>{other_name}</name>"),
        )
        .replace(&uuid, "00000000-0000-4000-8000-000000000001");
    let (_lab, service, pki_b) = libvirt_service(&pair).await;
    let mut a = PeerClient::connect(&pair.hosts, &service.addr, Path::new(&pki_b)).await;
    let mut b = PeerClient::connect(&pair.hosts, &service.addr, Path::new(&pki_b)).await;

    let (reply_a, reply_b) = tokio::join!(
        a.ask(Message::StartDomain { xml, disks: vda() }),
        b.ask(Message::StartDomain {
            xml: other,
            disks: vda()
        }),
    );

    let replies = [&reply_a, &reply_b];
    let started = replies
        .iter()
        .filter(|r| matches!(r, Message::DomainStarted { .. }))
        .count();
    let refused = replies
        .iter()
        .filter(|r| {
            matches!(
                r,
                Message::Error {
                    kind: ErrorKind::DestinationDisk,
                    refusal: true,
                    ..
                }
            )
        })
        .count();
    assert_eq!((started, refused), (1, 1), "{reply_a:?} / {reply_b:?}");
    assert!(disk.exists(), "the winner's disk");
    drop((a, b));
    let disks = [("vda", PathBuf::new(), disk.clone())];
    wait_destination_clean(&pair, &name, &disks).await;
    wait_destination_clean(&pair, &other_name, &disks).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_killed_while_a_domain_waits_is_cleaned_up_by_the_next_before_it_serves() {
    let pair = LibvirtPair::shared();
    let (name, _) = start_domain(&pair.b, "crash").await;
    let disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let xml_path = dest_xml_file(&pair, &name, &disk);
    let state = pair.a.dir.path().join(format!("state-{name}"));
    let state_arg = state.display().to_string();
    let extra = ["--libvirt", "--state-dir", state_arg.as_str()];
    let (_lab, mut crashed, pki_b) = libvirt_service_on(&pair, &pair.hosts.a_addr, &extra).await;
    let started = start_domain_request(
        &pair,
        &crashed.addr,
        &pki_b,
        std::fs::read_to_string(&xml_path).expect("XML"),
    )
    .await;
    assert!(
        matches!(started, Message::DomainStarted { .. }),
        "{started:?}"
    );
    crashed.kill().await;
    let left = (
        pair.a.virsh_ok(&["domstate", &name]).await,
        disk.exists(),
        records(&state),
    );

    let (_lab2, next, pki_b2) = libvirt_service_on(&pair, &pair.hosts.a_addr, &extra).await;
    let after = (
        pair.a.virsh(&["domstate", &name]).await.status.success(),
        disk.exists(),
        records(&state),
    );
    let args = served_args(&name, &next.addr, &pki_b2, &xml_path.display().to_string());
    let out = Cli::new(&args).in_host(&pair.b).output().await;

    assert_eq!(
        left,
        ("paused".to_string(), true, 1),
        "what the killed service left"
    );
    assert_eq!(after, (false, false, 0), "rolled back before serving");
    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// How many records a state directory holds.
fn records(state: &Path) -> usize {
    std::fs::read_dir(state)
        .map(|d| d.flatten().count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloudstack_shaped_domain_migrates_through_the_allow_list() {
    let pair = LibvirtPair::shared();
    let bridge = pair.bridge();
    let name = domain_name("cloudstack");
    let disk = pair.b.images_dir().join(format!("{name}.qcow2"));
    crate::libvirt::qcow2(&disk);
    let monitor = pair.b.qmp_dir().join(format!("{name}.sock"));
    let xml_path = pair.b.dir.path().join(format!("{name}.xml"));
    std::fs::write(
        &xml_path,
        fixture::cloudstack_domain_xml(&name, &disk, &monitor, bridge),
    )
    .expect("XML");
    pair.b
        .virsh_ok(&["define", xml_path.to_str().expect("UTF-8")])
        .await;
    pair.b.virsh_ok(&["start", &name]).await;
    let dest_disk = pair.a.images_dir().join(format!("{name}-in.qcow2"));
    let (_lab, _service, args) = served_migration(&pair, &name, &dest_disk).await;

    let out = Cli::new(&args).in_host(&pair.b).output().await;

    let json = fixture::stdout_json(&out);
    assert_eq!(out.status.code(), Some(0), "{json}");
    assert_eq!(pair.a.virsh_ok(&["domstate", &name]).await, "running");
    let live = pair.a.virsh_ok(&["dumpxml", &name]).await;
    for part in [
        format!("<source bridge='{bridge}'/>"),
        "<listen type='address' address='127.0.0.1'/>".to_string(),
        "name='org.qemu.guest_agent.0'".to_string(),
        "<backend model='random'>/dev/urandom</backend>".to_string(),
        "/run/qemu-tls-migrate/libvirt/qtm-in-".to_string(),
    ] {
        assert!(live.contains(&part), "{part}: {live}");
    }
    pair.a.virsh_ok(&["destroy", &name]).await;
    pair.b.virsh_ok(&["destroy", &name]).await;
}

/// A plan a source could send for a bare QEMU without disks.
fn plan() -> DestPlan {
    DestPlan {
        machine: None,
        postcopy: false,
        tls: true,
        tls_priority: None,
        multifd: None,
        multifd_compression: None,
        disks: Vec::new(),
        create_dest_disks: false,
        authz: Authz::Off,
        listen_address: "0.0.0.0".into(),
        port_range: qemu_tls_migrate::ports::DEFAULT_RANGE,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_source_naming_a_qmp_socket_another_session_holds_is_refused_busy() {
    let (hosts, _lab, pki_a, pki_b) = fixture::two_secured_hosts();
    let pair = fixture::Pair::builder().on(&hosts).start().await;
    let qmp_dir = fixture::qmp_dir(&pair.dest);
    let qmp = pair
        .dest
        .qmp_path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let service = Service::builder(&pki_a, &qmp_dir).on(&hosts).start().await;
    let preflight = || Message::Preflight {
        qmp: qmp.clone(),
        plan: plan(),
    };
    let mut owner = PeerClient::connect(&hosts, &service.addr, &pki_b).await;
    let mut other = PeerClient::connect(&hosts, &service.addr, &pki_b).await;

    let owned = owner.ask(preflight()).await;
    let refused = tokio::time::timeout(Duration::from_secs(5), other.ask(preflight()))
        .await
        .expect("answered at once");
    drop(owner);
    let after = retry_preflight(&hosts, &service, &pki_b, preflight).await;

    assert!(matches!(owned, Message::Preflighted { .. }), "{owned:?}");
    assert!(
        matches!(
            &refused,
            Message::Error {
                kind: ErrorKind::Busy,
                refusal: true,
                ..
            }
        ),
        "{refused:?}"
    );
    assert!(matches!(after, Message::Preflighted { .. }), "{after:?}");
    assert_eq!(
        fixture::status(&pair.dest).await,
        "inmigrate",
        "nobody quit it"
    );
}

/// Preflights from a new session until the socket is free again (the first session's end is
/// not announced), within 30 s.
async fn retry_preflight(
    hosts: &fixture::TwoHosts,
    service: &Service,
    pki: &Path,
    preflight: impl Fn() -> Message,
) -> Message {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = PeerClient::connect(hosts, &service.addr, pki).await;
        let reply = client.ask(preflight()).await;
        let busy = matches!(
            reply,
            Message::Error {
                kind: ErrorKind::Busy,
                ..
            }
        );
        if !busy || tokio::time::Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
