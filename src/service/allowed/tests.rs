//! The allow-list against a CloudStack VM's migratable XML (as libvirt 9.0 writes it for the
//! domain the agent defines), each forbidden construct, and mutations of it (proptest).

use std::path::{Path, PathBuf};

use super::*;
use crate::peer::NewDisk;

/// `virsh dumpxml --migratable` of a CloudStack-shaped domain on this machine's libvirt 9.0
/// (with a shared data disk and a dynamic AppArmor label added, as a CloudStack host has them).
const CLOUDSTACK: &str =
    "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>i-2-3-VM</name>
  <uuid>8e4f2a47-7d7c-4c43-a1f8-3f0d2d1b6a11</uuid>
  <description>Debian GNU/Linux 12 (64-bit)</description>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <cputune>
    <shares>1000</shares>
  </cputune>
  <resource>
    <partition>/machine</partition>
  </resource>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>Apache Software Foundation</entry>
      <entry name='product'>CloudStack KVM Hypervisor</entry>
      <entry name='uuid'>8e4f2a47-7d7c-4c43-a1f8-3f0d2d1b6a11</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='cdrom'/>
    <boot dev='hd'/>
    <smbios mode='sysinfo'/>
  </os>
  <features>
    <acpi/>
    <apic/>
    <pae/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
    <topology sockets='1' dies='1' cores='1' threads='1'/>
  </cpu>
  <clock offset='utc'>
    <timer name='kvmclock'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='STORAGE/root.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <serial>9a2b7c1d3e4f</serial>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='SHARED/data.raw'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
      <address type='drive' controller='0' bus='1' target='0' unit='0'/>
    </disk>
    <controller type='ide' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x1'/>
    </controller>
    <controller type='virtio-serial' index='0'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>
    </controller>
    <interface type='bridge'>
      <mac address='02:00:4c:5e:00:01'/>
      <source bridge='cloudbr0'/>
      <bandwidth>
        <inbound average='25000' peak='25000'/>
        <outbound average='25000' peak='25000'/>
      </bandwidth>
      <model type='virtio'/>
      <link state='up'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </interface>
    <serial type='pty'>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/i-2-3-VM.org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'>
      <address type='usb' bus='0' port='1'/>
    </input>
    <input type='mouse' bus='ps2'/>
    <graphics type='vnc' port='5901' autoport='no' listen='10.1.1.5' passwd='s3cret'>
      <listen type='address' address='10.1.1.5'/>
    </graphics>
    <video>
      <model type='cirrus' vram='16384' heads='1' primary='yes'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </video>
    <watchdog model='i6300esb' action='none'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x08' function='0x0'/>
    </watchdog>
    <memballoon model='virtio'>
      <stats period='0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/>
    </memballoon>
    <rng model='virtio'>
      <rate bytes='2048' period='1000'/>
      <backend model='random'>/dev/urandom</backend>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x07' function='0x0'/>
    </rng>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>
";

const EMULATOR: &str = "/usr/bin/qemu-system-x86_64";
const LISTEN: &str = "192.0.2.10";
const MONITOR: &str = "/run/qemu-tls-migrate/libvirt/qtm-in-0123.sock";

/// A host for the tests: a storage, a shared and a boot directory (canonical paths), the
/// shared disk and a kernel in them, bridge `cloudbr0` and network `default`.
struct Host {
    _root: tempfile::TempDir,
    storage: PathBuf,
    shared: PathBuf,
    boot: PathBuf,
    dirs: StorageDirs,
}

impl Host {
    fn new() -> Host {
        let root = tempfile::tempdir().expect("tmp");
        let base = std::fs::canonicalize(root.path()).expect("canonical");
        let (storage, shared, boot) = (base.join("pool"), base.join("nfs"), base.join("boot"));
        for d in [&storage, &shared, &boot] {
            std::fs::create_dir(d).expect("dir");
        }
        std::fs::write(shared.join("data.raw"), b"").expect("shared disk");
        std::fs::write(boot.join("vmlinuz"), b"").expect("kernel");
        let dirs = StorageDirs::new(
            std::slice::from_ref(&storage),
            std::slice::from_ref(&shared),
            std::slice::from_ref(&boot),
        )
        .expect("dirs");
        Host {
            _root: root,
            storage,
            shared,
            boot,
            dirs,
        }
    }

    /// The CloudStack XML with its disks in this host's directories.
    fn xml(&self) -> String {
        CLOUDSTACK
            .replace("STORAGE", &self.storage.display().to_string())
            .replace("SHARED", &self.shared.display().to_string())
    }

    fn build(&self, xml: &str) -> Result<AllowedDomain, AllowError> {
        let emulators = [EMULATOR.to_string()];
        let policy = Policy {
            dirs: &self.dirs,
            graphics_listen: LISTEN,
            emulators: &emulators,
            bridge_exists: &|b| b == "cloudbr0",
            network_active: &|n| n == "default",
        };
        build(xml, &root_disk(), &policy)
    }
}

/// The disk the source asks the service to create: `vda`.
fn root_disk() -> Vec<NewDisk> {
    vec![NewDisk {
        target: "vda".into(),
        format: "qcow2".into(),
        size: 64 << 20,
        backing: None,
        adopt: false,
        grow: false,
    }]
}

fn refusal(result: Result<AllowedDomain, AllowError>) -> String {
    match result {
        Ok(d) => panic!("allowed: {}", d.render(Path::new(MONITOR))),
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    }
}

#[test]
fn a_cloudstack_domain_is_built_with_the_services_monitor_graphics_and_disk_paths() {
    let host = Host::new();

    let allowed = host.build(&host.xml()).expect("allowed");
    let out = allowed.render(Path::new(MONITOR));

    let doc = Document::parse(&out).expect("well-formed");
    let root = doc.root_element();
    let args: Vec<&str> = root
        .descendants()
        .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("arg"))
        .filter_map(|n| n.attribute("value"))
        .collect();
    let find = |name: &'static str| root.descendants().filter(move |n| n.has_tag_name(name));
    assert_eq!(allowed.name, "i-2-3-VM");
    assert_eq!(allowed.uuid, "8e4f2a47-7d7c-4c43-a1f8-3f0d2d1b6a11");
    assert_eq!(
        args,
        [
            "-qmp",
            &format!("unix:{MONITOR},server=on,wait=off"),
            "-incoming",
            "defer"
        ]
    );
    assert_eq!(
        allowed.new_disks,
        [PlannedDisk {
            disk: root_disk()[0].clone(),
            path: host.storage.join("root.qcow2"),
            adopt: false,
        }]
    );
    let graphics = find("graphics").next().expect("graphics");
    assert_eq!(graphics.attribute("listen"), Some(LISTEN));
    assert_eq!(graphics.attribute("autoport"), Some("yes"));
    assert_eq!(graphics.attribute("port"), None);
    assert_eq!(graphics.attribute("passwd"), Some("s3cret"));
    let channel = find("channel").next().expect("channel");
    let source = channel.children().find(|c| c.has_tag_name("source"));
    assert_eq!(source.and_then(|s| s.attribute("path")), None);
    assert_eq!(find("seclabel").count(), 0);
    assert_eq!(find("backingStore").count(), 0);
    assert_eq!(find("disk").count(), 3);
    assert_eq!(find("address").count(), 12);
}

#[test]
fn the_domain_xml_library_reads_the_built_domain_as_the_service_does() {
    let host = Host::new();

    let out = host
        .build(&host.xml())
        .expect("allowed")
        .render(Path::new(MONITOR));
    let parsed = crate::libvirt::DomainXml::parse(out).expect("parse");

    assert_eq!(parsed.name().expect("name"), "i-2-3-VM");
    assert_eq!(
        parsed.declared_monitor().expect("monitor").map(|m| m.path),
        Some(PathBuf::from(MONITOR))
    );
    let disks = parsed.disks().expect("disks");
    assert_eq!(
        disks.iter().map(|d| d.file.clone()).collect::<Vec<_>>(),
        [
            Some(host.storage.join("root.qcow2")),
            Some(host.shared.join("data.raw")),
            None
        ]
    );
}

/// Each construct a source could use to run something of its choosing, and what the refusal
/// must name.
const FORBIDDEN: &[(&str, &str, &str)] = &[
    (
        "<qemu:arg value='unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off'/>",
        "<qemu:arg value='unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off'/>\
         <qemu:arg value='-chardev'/><qemu:arg value='file,id=x,path=/etc/passwd'/>",
        "-chardev",
    ),
    (
        "unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off",
        "tcp:0.0.0.0:4444,server=on,wait=off",
        "tcp:0.0.0.0:4444",
    ),
    (
        "unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off",
        "unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off,logfile=/etc/x",
        "logfile",
    ),
    (
        "<qemu:arg value='-qmp'/>",
        "<qemu:arg value='-device'/><qemu:arg value='virtio-9p-pci'/><qemu:arg value='-qmp'/>",
        "-device",
    ),
    (
        "<seclabel type='dynamic' model='apparmor' relabel='yes'/>",
        "<seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>",
        "seclabel",
    ),
    (
        "<seclabel type='dynamic' model='apparmor' relabel='yes'/>",
        "<seclabel type='none'/>",
        "seclabel",
    ),
    (
        "<memballoon model='virtio'>",
        "<hostdev mode='subsystem' type='pci' managed='yes'><source><address domain='0x0000' \
         bus='0x01' slot='0x00' function='0x0'/></source></hostdev><memballoon model='virtio'>",
        "hostdev",
    ),
    (
        "<memballoon model='virtio'>",
        "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>\
         <memballoon model='virtio'>",
        "filesystem",
    ),
    (
        "<qemu:commandline>",
        "<qemu:capabilities><qemu:add capability='blockdev'/></qemu:capabilities>\
         <qemu:commandline>",
        "capabilities",
    ),
    (
        "<on_crash>",
        "<launchSecurity type='sev'><policy>0x0003</policy></launchSecurity><on_crash>",
        "launchSecurity",
    ),
    ("<sysinfo type='smbios'>", "<sysinfo type='fwcfg'>", "fwcfg"),
    (
        "<entry name='manufacturer'>",
        "<entry name='manufacturer' file='/etc/shadow'>",
        "file",
    ),
    (
        "<disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>",
        "<disk type='block' device='cdrom'>\n      <driver name='qemu' type='raw'/>\
         <source dev='/dev/sda'/>",
        "block",
    ),
    (
        "<disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>",
        "<disk type='network' device='cdrom'>\n      <driver name='qemu' type='raw'/>",
        "network",
    ),
    (
        "<emulator>/usr/bin/qemu-system-x86_64</emulator>",
        "<emulator>/tmp/evil</emulator>",
        "emulator",
    ),
    (
        "<smbios mode='sysinfo'/>",
        "<kernel>/etc/shadow</kernel>",
        "kernel",
    ),
    (
        "<smbios mode='sysinfo'/>",
        "<initrd>/root/x</initrd>",
        "initrd",
    ),
    (
        "<smbios mode='sysinfo'/>",
        "<loader readonly='yes' type='pflash'>/etc/passwd</loader>",
        "loader",
    ),
    (
        "<smbios mode='sysinfo'/>",
        "<nvram>/var/lib/libvirt/qemu/nvram/other.fd</nvram>",
        "nvram",
    ),
    ("<os>", "<os firmware='efi'>", "firmware"),
    (
        "<description>",
        "<metadata><x:a xmlns:x='urn:x'/></metadata><description>",
        "metadata",
    ),
    (
        "<name>i-2-3-VM</name>",
        "<name>i-2-3<!---->-VM</name>",
        "<name>",
    ),
    (
        "<name>i-2-3-VM</name>",
        "<name>i-2-3-VM<?x y?></name>",
        "<name>",
    ),
    ("<name>i-2-3-VM</name>", "<name>../../etc</name>", "name"),
    (
        "<name>i-2-3-VM</name>",
        "<name>i-2-3-VM</name><name>other</name>",
        "name",
    ),
    ("<uuid>8e4f2a47", "<uuid>8e4f<!---->2a47", "uuid"),
    (
        "<source bridge='cloudbr0'/>",
        "<source bridge='cloud0'/>",
        "cloud0",
    ),
    (
        "<interface type='bridge'>",
        "<interface type='ethernet'><script path='/tmp/x.sh'/>",
        "ethernet",
    ),
    (
        "<mac address='02:00:4c:5e:00:01'/>",
        "<mac address='02:00:4c:5e:00:01'/><script path='/tmp/x.sh'/>",
        "script",
    ),
    (
        "<target type='virtio' name='org.qemu.guest_agent.0'/>",
        "<target type='virtio' name='org.example.other'/>",
        "org.example.other",
    ),
    (
        "<serial type='pty'>",
        "<serial type='file'><source path='/etc/x'/>",
        "file",
    ),
    (
        "<backend model='random'>/dev/urandom</backend>",
        "<backend model='random'>/dev/sda</backend>",
        "/dev/sda",
    ),
    (
        "<backend model='random'>/dev/urandom</backend>",
        "<backend model='egd' type='tcp'><source mode='connect' host='1.2.3.4' \
         service='708'/></backend>",
        "egd",
    ),
    (
        "<source file='SHARED/data.raw'/>",
        "<source file='/etc/shadow'/>",
        "--shared-dir",
    ),
    (
        "<source file='STORAGE/root.qcow2'/>",
        "<source file='/etc/profile.d/x.sh'/>",
        "--storage-dir",
    ),
    (
        "<source file='STORAGE/root.qcow2'/>",
        "<source file='STORAGE/root.qcow2'><seclabel model='dac' relabel='no'/></source>",
        "seclabel",
    ),
    (
        "<listen type='address' address='10.1.1.5'/>",
        "<listen type='socket' socket='/tmp/vnc.sock'/>",
        "socket",
    ),
    (
        "<memory unit='KiB'>",
        "<memoryBacking><source type='file'/></memoryBacking><memory unit='KiB'>",
        "source",
    ),
    (
        "<domain type='kvm'",
        "<domain type='kvm' xml:base='/etc'",
        "base",
    ),
    (
        "<features>",
        "<features xmlns='http://libvirt.org/schemas/domain/qemu/1.0'>",
        "namespace",
    ),
];

#[test]
fn each_forbidden_construct_is_refused_naming_it() {
    let host = Host::new();
    let base = host.xml();

    for (from, to, named) in FORBIDDEN {
        let (from, to) = (host_paths(&host, from), host_paths(&host, to));
        assert!(base.contains(&from), "the fixture has {from}");
        let xml = base.replacen(&from, &to, 1);

        let message = refusal(host.build(&xml));

        assert!(message.contains(named), "{to}: {message}");
    }
}

fn host_paths(host: &Host, s: &str) -> String {
    s.replace("STORAGE", &host.storage.display().to_string())
        .replace("SHARED", &host.shared.display().to_string())
}

#[test]
fn a_kernel_in_a_boot_dir_is_allowed_at_its_resolved_path() {
    let host = Host::new();
    let xml = host.xml().replace(
        "<smbios mode='sysinfo'/>",
        &format!(
            "<kernel>{}/../boot/vmlinuz</kernel><cmdline>console=ttyS0 x=\"1\"</cmdline>",
            host.boot.display()
        ),
    );

    let out = host
        .build(&xml)
        .expect("allowed")
        .render(Path::new(MONITOR));

    assert!(
        out.contains(&format!(
            "<kernel>{}</kernel>",
            host.boot.join("vmlinuz").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("<cmdline>console=ttyS0 x=&quot;1&quot;</cmdline>"),
        "{out}"
    );
}

#[test]
fn a_disk_the_source_asks_for_must_be_a_file_disk_of_the_domain() {
    let host = Host::new();
    let emulators = [EMULATOR.to_string()];
    let policy = Policy {
        dirs: &host.dirs,
        graphics_listen: LISTEN,
        emulators: &emulators,
        bridge_exists: &|_| true,
        network_active: &|_| true,
    };
    let mut disks = root_disk();
    disks[0].target = "vdz".into();
    let mut odd_format = root_disk();
    odd_format[0].format = "vvfat".into();

    let missing = refusal(build(&host.xml(), &disks, &policy));
    let format = refusal(build(&host.xml(), &odd_format, &policy));

    assert!(
        missing.contains("vdz") && missing.contains("vda, vdb, hdc"),
        "{missing}"
    );
    assert!(format.contains("vvfat"), "{format}");
}

/// Every name, attribute and value of `out` is on the list, and the host's rules hold: what a
/// built domain must be, whatever the source sent.
fn assert_inside_the_list(out: &str, host: &Host, allowed: &AllowedDomain) {
    let doc = Document::parse(out).expect("the built domain is well-formed");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "domain");
    assert_on_the_list(root, out);
    assert_the_host_rules(root, out, host, allowed);
}

/// Every element, attribute and text below `root` (of the document `out`) is on the list, and
/// the one `<qemu:commandline>` is the service's monitor and `-incoming defer`.
fn assert_on_the_list(root: roxmltree::Node<'_, '_>, out: &str) {
    let mut commandlines = 0;
    let mut stack = vec![(root, "domain".to_string())];
    while let Some((node, path)) = stack.pop() {
        let rule = RULE_MAP
            .get(&path)
            .unwrap_or_else(|| panic!("{path} is not on the list: {out}"));
        assert_eq!(node.tag_name().namespace(), None, "{path}");
        let siblings = node
            .parent_element()
            .map(|p| {
                p.children()
                    .filter(|c| c.tag_name() == node.tag_name())
                    .count()
            })
            .unwrap_or(1);
        assert!(rule.repeat || siblings == 1, "{path} repeated: {out}");
        for attr in node.attributes() {
            let allowed = rule
                .attrs
                .iter()
                .find(|(n, _)| attr.namespace().is_none() && *n == attr.name());
            assert!(
                allowed.is_some_and(|(_, v)| v.check(attr.value(), false)),
                "{path} {}={:?}: {out}",
                attr.name(),
                attr.value()
            );
        }
        for child in node.children() {
            match child.node_type() {
                NodeType::Element
                    if path == "domain" && child.tag_name().namespace() == Some(QEMU_NS) =>
                {
                    commandlines += 1;
                    let args: Vec<&str> = child
                        .children()
                        .filter(|a| a.is_element())
                        .map(|a| a.attribute("value").unwrap_or_default())
                        .collect();
                    let monitor = format!("unix:{MONITOR},server=on,wait=off");
                    assert_eq!(args, ["-qmp", monitor.as_str(), "-incoming", "defer"]);
                }
                NodeType::Element => {
                    assert!(rule.text.is_none(), "{path} holds text and elements");
                    stack.push((child, format!("{path}/{}", child.tag_name().name())));
                }
                NodeType::Text => match rule.text {
                    Some(v) => assert!(v.check(child.text().unwrap_or_default(), true), "{path}"),
                    None => assert!(child.text().unwrap_or_default().trim().is_empty()),
                },
                other => panic!("{other:?} in {path}: {out}"),
            }
        }
    }
    assert_eq!(commandlines, 1, "{out}");
}

/// The host's rules hold in the built domain `root` (of the document `out`): files in its
/// directories, graphics on its address, its emulator, its bridge or network, its name.
fn assert_the_host_rules(
    root: roxmltree::Node<'_, '_>,
    out: &str,
    host: &Host,
    allowed: &AllowedDomain,
) {
    let all = |name: &'static str| root.descendants().filter(move |n| n.has_tag_name(name));
    for source in all("disk").flat_map(|d| d.children().filter(|c| c.has_tag_name("source"))) {
        if let Some(file) = source.attribute("file") {
            let file = Path::new(file);
            assert!(
                file.starts_with(&host.storage) || file.starts_with(&host.shared),
                "{}: {out}",
                file.display()
            );
        }
    }
    for disk in &allowed.new_disks {
        assert!(disk.path.starts_with(&host.storage), "{:?}", disk.path);
        assert!(!disk.path.exists(), "building creates nothing");
    }
    for graphics in all("graphics") {
        assert_eq!(graphics.attribute("listen"), Some(LISTEN));
        assert_eq!(graphics.attribute("port"), None);
        for listen in graphics.children().filter(|c| c.is_element()) {
            assert_eq!(listen.attribute("address"), Some(LISTEN));
        }
    }
    for emulator in all("emulator") {
        assert_eq!(emulator.text(), Some(EMULATOR));
    }
    for boot in ["kernel", "initrd", "loader"] {
        for file in all(boot) {
            assert!(Path::new(file.text().unwrap_or_default()).starts_with(&host.boot));
        }
    }
    for channel in all("channel") {
        for source in channel.children().filter(|c| c.has_tag_name("source")) {
            assert_eq!(source.attribute("path"), None);
        }
    }
    for interface in all("interface") {
        let source = interface.children().find(|c| c.has_tag_name("source"));
        let on = source.and_then(|s| s.attribute("bridge").or(s.attribute("network")));
        assert!(matches!(on, Some("cloudbr0" | "default")), "{out}");
    }
    let name = all("name").next().and_then(|n| n.text());
    assert_eq!(name, Some(allowed.name.as_str()));
}

mod mutate {
    //! Mutations of a domain XML, applied through the parser's own ranges so that most of them
    //! stay well-formed (and so reach the allow-list rather than the parser).

    use proptest::prelude::*;
    use roxmltree::Document;

    const NAMES: &[&str] = &[
        "seclabel",
        "hostdev",
        "filesystem",
        "qemu:arg",
        "qemu:commandline",
        "qemu:capabilities",
        "launchSecurity",
        "sysinfo",
        "entry",
        "kernel",
        "initrd",
        "loader",
        "nvram",
        "emulator",
        "disk",
        "source",
        "target",
        "driver",
        "interface",
        "script",
        "serial",
        "console",
        "channel",
        "graphics",
        "listen",
        "name",
        "uuid",
        "metadata",
        "backingStore",
        "rng",
        "backend",
        "memballoon",
        "watchdog",
        "address",
        "alias",
        "cpu",
        "model",
        "feature",
        "os",
        "devices",
        "domain",
        "label",
        "smbios",
        "boot",
        "redirdev",
        "shmem",
        "tpm",
        "x:y",
    ];
    const ATTRS: &[&str] = &[
        "type",
        "file",
        "dev",
        "path",
        "bridge",
        "network",
        "value",
        "name",
        "mode",
        "listen",
        "port",
        "model",
        "relabel",
        "xmlns",
        "xmlns:q",
        "xml:base",
        "startupPolicy",
        "passwd",
        "address",
        "socket",
        "managed",
        "unit",
        "action",
        "machine",
        "arch",
        "id",
    ];
    const VALUES: &[&str] = &[
        "block",
        "network",
        "file",
        "/etc/shadow",
        "/dev/sda",
        "../../etc/x",
        "STORAGE/x.qcow2",
        "STORAGE/../x",
        "STORAGE/root.qcow2",
        "SHARED/data.raw",
        "SHARED/../pool/root.qcow2",
        "BOOT/vmlinuz",
        "tcp:0.0.0.0:4444,server=on,wait=off",
        "-chardev",
        "file,id=x,path=/tmp/x",
        "unix:/tmp/x.sock,server=on,wait=off",
        "-qmp",
        "-incoming",
        "static",
        "dynamic",
        "none",
        "yes",
        "no",
        "0x1",
        "-1",
        "5900",
        "cloudbr0",
        "cloud0",
        "default",
        "0.0.0.0",
        "",
        " ",
        "qemu64",
        "i6300esb",
        "/dev/urandom",
        "/dev/random",
        "org.qemu.guest_agent.0",
        "http://libvirt.org/schemas/domain/qemu/1.0",
        "i-2-3-VM",
        "vda",
        "vdb",
        "qcow2",
        "raw",
        "pty",
        "unix",
        "bind",
        "spicevmc",
        "vnc",
        "smbios",
        "fwcfg",
        "/usr/bin/qemu-system-x86_64",
        "/usr/bin/kvm",
        "a\nb",
        "\u{e9}t\u{e9}",
    ];
    const RAW: &[&str] = &[
        "<!--x-->",
        "<![CDATA[y]]>",
        "<?pi x?>",
        "&amp;",
        "&#10;",
        "<x/>",
        "'",
        "\"",
        "<",
        ">",
        "</disk>",
        "<disk type='file'>",
        " a='b'",
        "\u{0}",
        "\n",
        "]]>",
        "&#0;",
        "&lt;",
    ];

    /// One change to a document.
    #[derive(Debug, Clone)]
    pub enum Op {
        /// A new element inside the `at`-th element, before its `pos`-th child.
        Insert {
            at: usize,
            pos: usize,
            name: String,
            attr: Option<(String, String)>,
            text: Option<String>,
        },
        /// The `at`-th element renamed (start and end tags).
        Rename {
            at: usize,
            name: String,
        },
        /// An attribute of the `at`-th element set (added, or its value replaced).
        SetAttr {
            at: usize,
            name: String,
            value: String,
        },
        /// The `at`-th element's `n`-th attribute removed.
        RemoveAttr {
            at: usize,
            n: usize,
        },
        /// The `at`-th text node replaced.
        SetText {
            at: usize,
            value: String,
        },
        /// Raw markup inserted into the `at`-th text node (or at a byte offset), well-formed or not.
        Raw {
            at: usize,
            raw: String,
        },
        /// The `at`-th element written twice, or removed.
        Duplicate {
            at: usize,
        },
        Remove {
            at: usize,
        },
    }

    fn pick(pool: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            4 => proptest::sample::select(pool).prop_map(str::to_string),
            1 => "[a-zA-Z:_./-]{0,12}",
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            6 => proptest::sample::select(VALUES).prop_map(str::to_string),
            1 => any::<String>().prop_map(|s| s.chars().take(16).collect()),
        ]
    }

    pub fn op() -> impl Strategy<Value = Op> {
        let at = 0..200usize;
        prop_oneof![
            (
                at.clone(),
                0..8usize,
                pick(NAMES),
                proptest::option::of((pick(ATTRS), value())),
                proptest::option::of(value())
            )
                .prop_map(|(at, pos, name, attr, text)| Op::Insert {
                    at,
                    pos,
                    name,
                    attr,
                    text
                }),
            (at.clone(), pick(NAMES)).prop_map(|(at, name)| Op::Rename { at, name }),
            (at.clone(), pick(ATTRS), value()).prop_map(|(at, name, value)| Op::SetAttr {
                at,
                name,
                value
            }),
            (at.clone(), 0..4usize).prop_map(|(at, n)| Op::RemoveAttr { at, n }),
            (at.clone(), value()).prop_map(|(at, value)| Op::SetText { at, value }),
            (
                0..20_000usize,
                proptest::sample::select(RAW).prop_map(str::to_string)
            )
                .prop_map(|(at, raw)| Op::Raw { at, raw }),
            at.clone().prop_map(|at| Op::Duplicate { at }),
            at.prop_map(|at| Op::Remove { at }),
        ]
    }

    fn esc(s: &str) -> String {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('\'', "&apos;")
            .replace('"', "&quot;")
    }

    /// `xml` with the bytes `r` replaced by `with`.
    fn spliced(xml: &str, r: std::ops::Range<usize>, with: &str) -> String {
        format!("{}{}{}", &xml[..r.start], with, &xml[r.end..])
    }

    /// [`Op::Insert`] into `parent`.
    fn insert(
        xml: &str,
        parent: roxmltree::Node<'_, '_>,
        pos: usize,
        name: &str,
        attr: Option<&(String, String)>,
        text: Option<&str>,
    ) -> String {
        let attr = attr
            .map(|(n, v)| format!(" {n}='{}'", esc(v)))
            .unwrap_or_default();
        let new = match text {
            Some(t) => format!("<{name}{attr}>{}</{name}>", esc(t)),
            None => format!("<{name}{attr}/>"),
        };
        match parent.children().nth(pos) {
            Some(child) => spliced(xml, child.range().start..child.range().start, &new),
            None => {
                let r = parent.range();
                let inner = &xml[r.clone()];
                match inner.rfind("</") {
                    Some(i) if !inner.ends_with("/>") => {
                        spliced(xml, r.start + i..r.start + i, &new)
                    }
                    _ => xml.to_string(),
                }
            }
        }
    }

    /// [`Op::Rename`] of `e`.
    fn rename(xml: &str, e: roxmltree::Node<'_, '_>, name: &str) -> String {
        let r = e.range();
        let text = &xml[r.clone()];
        let old = &text[1..text
            .find(|c: char| c.is_whitespace() || c == '>' || c == '/')
            .unwrap_or(1)];
        let mut renamed = format!("<{name}{}", &text[1 + old.len()..]);
        let end = format!("</{old}>");
        if renamed.ends_with(&end) {
            renamed.truncate(renamed.len() - end.len());
            renamed.push_str(&format!("</{name}>"));
        }
        spliced(xml, r, &renamed)
    }

    /// [`Op::SetAttr`] on `e`.
    fn set_attr(xml: &str, e: roxmltree::Node<'_, '_>, name: &str, value: &str) -> String {
        match e.attributes().find(|a| a.name() == name) {
            Some(a) => spliced(xml, a.range_value(), &esc(value)),
            None => {
                let start = e.range().start
                    + 1
                    + e.tag_name().name().len()
                    + e.tag_name()
                        .namespace()
                        .and_then(|ns| e.lookup_prefix(ns))
                        .map(|p| p.len() + 1)
                        .unwrap_or(0);
                spliced(xml, start..start, &format!(" {name}='{}'", esc(value)))
            }
        }
    }

    /// `op` applied to `xml`; a document that no longer parses gets raw insertions only.
    pub fn apply(xml: &str, op: &Op) -> String {
        let splice = |r: std::ops::Range<usize>, with: &str| spliced(xml, r, with);
        let Ok(doc) = Document::parse(xml) else {
            return match op {
                Op::Raw { at, raw } => {
                    let at = (0..=(*at).min(xml.len()))
                        .rev()
                        .find(|i| xml.is_char_boundary(*i))
                        .unwrap_or(0);
                    splice(at..at, raw)
                }
                _ => xml.to_string(),
            };
        };
        let elements: Vec<_> = doc.descendants().filter(|n| n.is_element()).collect();
        let texts: Vec<_> = doc.descendants().filter(|n| n.is_text()).collect();
        let element = |at: usize| elements[at % elements.len()];
        match op {
            Op::Insert {
                at,
                pos,
                name,
                attr,
                text,
            } => insert(
                xml,
                element(*at),
                *pos,
                name,
                attr.as_ref(),
                text.as_deref(),
            ),
            Op::Rename { at, name } => rename(xml, element(*at), name),
            Op::SetAttr { at, name, value } => set_attr(xml, element(*at), name, value),
            Op::RemoveAttr { at, n } => match element(*at).attributes().nth(*n) {
                Some(a) => splice(a.range(), ""),
                None => xml.to_string(),
            },
            Op::SetText { at, value } if !texts.is_empty() => {
                splice(texts[at % texts.len()].range(), &esc(value))
            }
            Op::Raw { at, raw } if !texts.is_empty() => {
                let t = texts[at % texts.len()];
                let r = t.range();
                let mid = (r.start..=r.end)
                    .rev()
                    .skip((r.end - r.start) / 2)
                    .find(|i| xml.is_char_boundary(*i))
                    .unwrap_or(r.start);
                splice(mid..mid, raw)
            }
            Op::Duplicate { at } => {
                let r = element(*at).range();
                let copy = xml[r.clone()].to_string();
                splice(r.end..r.end, &copy)
            }
            Op::Remove { at } => splice(element(*at).range(), ""),
            _ => xml.to_string(),
        }
    }
}

/// The number of mutated documents the property test tries (`PROPTEST_CASES` for a longer run).
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

#[test]
#[allow(clippy::print_stderr)] // the figures of a long run, for the README
fn a_mutated_cloudstack_domain_is_refused_or_built_inside_the_list() {
    use proptest::test_runner::{Config, TestRunner};
    let host = Host::new();
    let base = host.xml();
    let config = Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let (built, refused) = (
        std::sync::atomic::AtomicU64::new(0),
        std::sync::atomic::AtomicU64::new(0),
    );

    let result = runner.run(&proptest::collection::vec(mutate::op(), 1..4), |ops| {
        let xml = ops.iter().fold(base.clone(), |xml, op| {
            host_paths(&host, &mutate::apply(&xml, op))
                .replace("BOOT", &host.boot.display().to_string())
        });
        match host.build(&xml) {
            Ok(allowed) => {
                built.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                assert_inside_the_list(&allowed.render(Path::new(MONITOR)), &host, &allowed);
            }
            Err(_) => {
                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        Ok(())
    });

    eprintln!(
        "allow-list property: {} inputs, {} built inside the list, {} refused",
        built.load(std::sync::atomic::Ordering::Relaxed)
            + refused.load(std::sync::atomic::Ordering::Relaxed),
        built.load(std::sync::atomic::Ordering::Relaxed),
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn a_domain_a_service_brought_in_earlier_is_taken_again_with_this_services_arguments_only() {
    let host = Host::new();
    let earlier = host.xml().replace(
        "<qemu:arg value='unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off'/>",
        "<qemu:arg value='unix:/run/qemu-tls-migrate/libvirt/qtm-in-0a1b.sock,server=on,\
         wait=off'/><qemu:arg value='-incoming'/><qemu:arg value='defer'/>",
    );
    assert_ne!(
        earlier,
        host.xml(),
        "the XML has the arguments a service leaves"
    );

    let out = host
        .build(&earlier)
        .expect("allowed")
        .render(Path::new(MONITOR));

    assert!(!out.contains("qtm-in-0a1b"), "{out}");
    assert_eq!(
        out.matches("'-incoming'").count() + out.matches("\"-incoming\"").count(),
        1,
        "{out}"
    );
}

/// The source asks to adopt the root disk's path: a regular file in the storage directory is
/// planned as adopted; a symbolic link there (to another VM's disk outside it) or a path that
/// escapes the storage directory through `..` is refused naming the path, and the file it
/// points at is left as it was.
#[test]
fn an_adopted_path_must_be_a_regular_file_inside_the_storage_dir() {
    let host = Host::new();
    let emulators = [EMULATOR.to_string()];
    let policy = Policy {
        dirs: &host.dirs,
        graphics_listen: LISTEN,
        emulators: &emulators,
        bridge_exists: &|b| b == "cloudbr0",
        network_active: &|n| n == "default",
    };
    let adopting = vec![NewDisk {
        adopt: true,
        ..root_disk()[0].clone()
    }];
    let root = host.storage.join("root.qcow2");

    std::fs::write(&root, b"").expect("a volume made for the migration");
    let allowed = build(&host.xml(), &adopting, &policy).expect("a regular file is adopted");
    assert_eq!(allowed.new_disks[0].path, root);
    assert!(allowed.new_disks[0].adopt);

    std::fs::remove_file(&root).expect("remove");
    let victim = host.shared.join("another-vm.qcow2");
    std::fs::write(&victim, b"another VM's disk").expect("victim");
    std::os::unix::fs::symlink(&victim, &root).expect("link");
    let through_link = refusal(build(&host.xml(), &adopting, &policy));
    assert!(through_link.contains("symbolic link"), "{through_link}");

    let escaping = host.xml().replace(
        &format!("{}/root.qcow2", host.storage.display()),
        &format!("{}/../nfs/another-vm.qcow2", host.storage.display()),
    );
    let outside = refusal(build(&escaping, &adopting, &policy));
    assert!(outside.contains("outside"), "{outside}");
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"another VM's disk",
        "nothing was written to the file a link or a path pointed at"
    );
}
