//! Reading and editing libvirt domain XML.
//!
//! Reading goes through `roxmltree` (a namespace-aware, read-only parser). Editing is careful
//! splicing, not a rewrite: each edit parses the document, takes the byte range that the parser
//! reports for the node to change (`roxmltree::Node::range`), and replaces or inserts text there,
//! escaping what it inserts. Everything else in the document stays byte for byte as libvirt wrote
//! it, which a serialising XML writer would not promise (attribute quoting, namespace
//! declarations, whitespace). No edit looks for markup with string searches outside the range
//! the parser gave it.
//!
//! The QMP monitor a domain declares for this tool is a pair of arguments in its
//! `<qemu:commandline>` (namespace [`QEMU_NS`]):
//!
//! ```xml
//! <qemu:commandline>
//!   <qemu:arg value='-qmp'/>
//!   <qemu:arg value='unix:/run/qtm/i-2-3-VM.sock,server=on,wait=off'/>
//! </qemu:commandline>
//! ```

use std::ops::Range;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};

use super::LibvirtError;

/// The XML namespace of libvirt's QEMU-specific domain elements (`<qemu:commandline>`).
pub const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// A QMP monitor declared in a domain's `<qemu:commandline>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredMonitor {
    /// The UNIX socket QEMU listens on.
    pub path: PathBuf,
}

/// A disk of a domain, from its `<devices><disk>` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The guest device name (`<target dev='vda'/>`): how disks are matched across hosts.
    pub target: String,
    /// `disk`, `cdrom`, `floppy` or `lun` (`<disk device=...>`; `disk` when absent).
    pub device: String,
    /// The image file (`<source file=...>`), for `type='file'` disks that have one.
    pub file: Option<PathBuf>,
    /// The image format (`<driver type='qcow2'/>`), if given.
    pub format: Option<String>,
    /// `<readonly/>` is present.
    pub readonly: bool,
    /// The device's id in QEMU (`<alias name='virtio-disk0'/>`), in the XML of a running
    /// domain; the same on every host the domain migrates to.
    pub alias: Option<String>,
}

/// A domain's XML, checked to be a `<domain>` document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainXml {
    text: String,
}

impl DomainXml {
    /// Checks that `text` is well-formed XML whose root is `<domain>` with a `<name>`.
    pub fn parse(text: impl Into<String>) -> Result<DomainXml, LibvirtError> {
        let xml = DomainXml { text: text.into() };
        if xml.text.contains('\0') {
            return Err(xml_error("it contains a NUL byte"));
        }
        let doc = xml.doc()?;
        if child(doc.root_element(), "name").is_none() {
            return Err(xml_error("<domain> has no <name>"));
        }
        Ok(xml)
    }

    /// The document as text.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The domain's `<name>`.
    pub fn name(&self) -> Result<String, LibvirtError> {
        let doc = self.doc()?;
        Ok(child(doc.root_element(), "name")
            .and_then(|n| n.text())
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    /// The domain's `<uuid>`, if the XML carries one.
    pub fn uuid(&self) -> Result<Option<String>, LibvirtError> {
        let doc = self.doc()?;
        Ok(child(doc.root_element(), "uuid")
            .and_then(|n| n.text())
            .map(|t| t.trim().to_string()))
    }

    /// The first QMP monitor on a UNIX socket that the domain's `<qemu:commandline>` declares
    /// (`-qmp unix:PATH,server=on,...`); `None` when there is none.
    pub fn declared_monitor(&self) -> Result<Option<DeclaredMonitor>, LibvirtError> {
        let doc = self.doc()?;
        let args = qemu_args(doc.root_element());
        Ok(args
            .windows(2)
            .filter(|w| is_qmp_option(w[0].1))
            .find_map(|w| parse_unix_server(w[1].1))
            .map(|path| DeclaredMonitor { path }))
    }

    /// The domain's disks, in document order.
    pub fn disks(&self) -> Result<Vec<DiskSpec>, LibvirtError> {
        let doc = self.doc()?;
        Ok(disk_elements(doc.root_element())
            .into_iter()
            .filter_map(|(disk, target)| {
                Some(DiskSpec {
                    target: target?.to_string(),
                    device: disk.attribute("device").unwrap_or("disk").to_string(),
                    file: child(disk, "source")
                        .and_then(|s| s.attribute("file"))
                        .map(PathBuf::from),
                    format: child(disk, "driver")
                        .and_then(|d| d.attribute("type"))
                        .map(str::to_string),
                    readonly: child(disk, "readonly").is_some(),
                    alias: child(disk, "alias")
                        .and_then(|a| a.attribute("name"))
                        .map(str::to_string),
                })
            })
            .collect())
    }

    /// The same XML with disk `target`'s image file (`<source file=...>`) set to `file`.
    pub fn with_disk_file(&self, target: &str, file: &Path) -> Result<DomainXml, LibvirtError> {
        let file = file
            .to_str()
            .ok_or_else(|| xml_error("the disk path is not UTF-8"))?;
        let doc = self.doc()?;
        let attr = disk_elements(doc.root_element())
            .into_iter()
            .find(|(_, t)| *t == Some(target))
            .ok_or_else(|| xml_error(&format!("no disk with target {target:?}")))?
            .0;
        let attr = child(attr, "source")
            .and_then(|s| s.attribute_node("file"))
            .ok_or_else(|| xml_error(&format!("disk {target:?} has no <source file=...>")))?;
        self.spliced(attr.range_value(), &escape(file))
    }

    /// The same XML with `<name>` set to `name`.
    pub fn with_name(&self, name: &str) -> Result<DomainXml, LibvirtError> {
        let doc = self.doc()?;
        let node = child(doc.root_element(), "name").ok_or_else(|| xml_error("no <name>"))?;
        let range = inner_range(&self.text, node);
        self.spliced(range, &escape(name))
    }

    /// The same XML without `<uuid>`: libvirt gives the domain a new, random UUID.
    pub fn without_uuid(&self) -> Result<DomainXml, LibvirtError> {
        let doc = self.doc()?;
        match child(doc.root_element(), "uuid") {
            Some(node) => self.spliced(node.range(), ""),
            None => Ok(self.clone()),
        }
    }

    /// The same XML with the declared QMP monitor moved to `path`, or, when the domain declares
    /// none, with one added (`-qmp unix:PATH,server=on,wait=off`).
    pub fn with_monitor(&self, path: &Path) -> Result<DomainXml, LibvirtError> {
        let value = monitor_arg(path)?;
        let doc = self.doc()?;
        let args = qemu_args(doc.root_element());
        let declared = args
            .windows(2)
            .find(|w| is_qmp_option(w[0].1) && parse_unix_server(w[1].1).is_some());
        match declared {
            Some(w) => {
                let attr = w[1]
                    .0
                    .attribute_node("value")
                    .ok_or_else(|| xml_error("a <qemu:arg> has no value"))?;
                self.spliced(attr.range_value(), &escape(&value))
            }
            None => self.with_qemu_args(&["-qmp", &value]),
        }
    }

    /// The same XML with `args` appended to QEMU's command line through `<qemu:commandline>`
    /// (added, with its namespace declaration, when the domain has none).
    pub fn with_qemu_args(&self, args: &[&str]) -> Result<DomainXml, LibvirtError> {
        let doc = self.doc()?;
        let root = doc.root_element();
        let existing = root
            .children()
            .find(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("commandline"));
        match existing {
            Some(cmdline) => {
                let prefix = cmdline
                    .lookup_prefix(QEMU_NS)
                    .map(|p| format!("{p}:"))
                    .unwrap_or_default();
                let arg_elems: String = args
                    .iter()
                    .map(|a| format!("\n    <{prefix}arg value='{}'/>", escape(a)))
                    .collect();
                let range = cmdline.range();
                let element = &self.text[range.clone()];
                if element.ends_with("/>") {
                    // `<qemu:commandline/>`: its start tag (with any namespace declaration it
                    // carries) is kept; only the closing `/>` becomes `>`, content, end tag.
                    let at = range.end - 2;
                    let replacement = format!(">{arg_elems}\n  </{prefix}commandline>");
                    self.spliced(at..range.end, &replacement)
                } else {
                    let at = end_tag_start(&self.text, range)?;
                    self.spliced(at..at, &format!("{arg_elems}\n  "))
                }
            }
            None => {
                let arg_elems: String = args
                    .iter()
                    .map(|a| format!("\n    <qemu:arg value='{}'/>", escape(a)))
                    .collect();
                let block = format!(
                    "  <qemu:commandline xmlns:qemu='{QEMU_NS}'>{arg_elems}\n  </qemu:commandline>\n"
                );
                let at = end_tag_start(&self.text, root.range())?;
                self.spliced(at..at, &block)
            }
        }
    }

    /// The same XML without the `<qemu:commandline>` a `serve --libvirt` gives a domain it
    /// brings in (exactly `-qmp unix:DIR/qtm-in-ID.sock,server=on,wait=off -incoming defer`),
    /// or `None` when the domain has none. libvirt keeps a running domain's arguments, so a
    /// domain the service brought in carries them into its next migration by libvirt; a
    /// destination's libvirt hook ([`crate::libvirt`]'s `host libvirt-hook`) removes them there.
    pub fn without_service_commandline(&self) -> Result<Option<DomainXml>, LibvirtError> {
        let doc = self.doc()?;
        let root = doc.root_element();
        let service = root
            .children()
            .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("commandline"))
            .find(|c| {
                let args: Vec<&str> = c
                    .children()
                    .filter(|n| n.is_element())
                    .map(|n| {
                        if n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("arg") {
                            n.attribute("value").unwrap_or("")
                        } else {
                            ""
                        }
                    })
                    .collect();
                matches!(args.as_slice(),
                    ["-qmp", spec, "-incoming", "defer"] if is_service_monitor(spec))
            });
        let Some(element) = service else {
            return Ok(None);
        };
        let range = element.range();
        // The element's own line goes with it: the indentation before it, the newline after.
        let start = self.text[..range.start]
            .rfind(|c: char| c != ' ' && c != '\t')
            .map_or(range.start, |i| i + 1);
        let end = if self.text[range.end..].starts_with('\n') {
            range.end + 1
        } else {
            range.end
        };
        self.spliced(start..end, "").map(Some)
    }

    fn doc(&self) -> Result<Document<'_>, LibvirtError> {
        let doc =
            Document::parse(&self.text).map_err(|source| LibvirtError::XmlParse { source })?;
        if !doc.root_element().has_tag_name("domain") {
            return Err(xml_error(&format!(
                "the root element is <{}>, not <domain>",
                doc.root_element().tag_name().name()
            )));
        }
        Ok(doc)
    }

    /// A new document: `range` of this one replaced by `with`, checked again.
    fn spliced(&self, range: Range<usize>, with: &str) -> Result<DomainXml, LibvirtError> {
        let mut text = String::with_capacity(self.text.len() + with.len());
        text.push_str(&self.text[..range.start]);
        text.push_str(with);
        text.push_str(&self.text[range.end..]);
        DomainXml::parse(text)
    }
}

impl std::fmt::Display for DomainXml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

fn xml_error(reason: &str) -> LibvirtError {
    LibvirtError::Xml {
        reason: reason.to_string(),
    }
}

/// The first child element of `node` named `name` (no namespace: libvirt's own elements).
fn child<'a, 'i>(node: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    node.children()
        .find(|n| n.is_element() && n.tag_name().namespace().is_none() && n.has_tag_name(name))
}

/// Each `<devices><disk>` element with its `<target dev=...>`.
fn disk_elements<'a, 'i>(root: Node<'a, 'i>) -> Vec<(Node<'a, 'i>, Option<&'a str>)> {
    child(root, "devices")
        .into_iter()
        .flat_map(|d| d.children())
        .filter(|n| n.is_element() && n.tag_name().namespace().is_none() && n.has_tag_name("disk"))
        .map(|disk| (disk, child(disk, "target").and_then(|t| t.attribute("dev"))))
        .collect()
}

/// The `value` of every `<qemu:arg>` in the domain's `<qemu:commandline>` elements, in order,
/// with the element that carries it.
fn qemu_args<'a, 'i>(root: Node<'a, 'i>) -> Vec<(Node<'a, 'i>, &'a str)> {
    root.children()
        .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("commandline"))
        .flat_map(|c| c.children())
        .filter(|n| n.tag_name().namespace() == Some(QEMU_NS) && n.has_tag_name("arg"))
        .filter_map(|n| n.attribute("value").map(|v| (n, v)))
        .collect()
}

fn is_qmp_option(arg: &str) -> bool {
    matches!(arg, "-qmp" | "--qmp" | "-qmp-pretty" | "--qmp-pretty")
}

/// The socket path of a QEMU character device spec `unix:PATH[,opt...]` that listens
/// (`server`, `server=on`); QEMU writes a comma inside the path as `,,`.
fn parse_unix_server(spec: &str) -> Option<PathBuf> {
    let rest = spec.strip_prefix("unix:")?;
    let mut parts = split_options(rest).into_iter();
    let path = parts.next().filter(|p| !p.is_empty())?;
    let server = parts.any(|o| matches!(o.as_str(), "server" | "server=on" | "server=yes"));
    server.then(|| PathBuf::from(path))
}

/// A `-qmp` spec naming a socket of the service's incoming domains: `qtm-in-ID.sock`,
/// listening, not waiting.
fn is_service_monitor(spec: &str) -> bool {
    let opts: Vec<String> = spec
        .strip_prefix("unix:")
        .map(split_options)
        .unwrap_or_default();
    let named = opts
        .first()
        .and_then(|p| Path::new(p).file_name())
        .is_some_and(|n| {
            let n = n.to_string_lossy();
            n.starts_with("qtm-in-") && n.ends_with(".sock")
        });
    named && opts[1..] == ["server=on", "wait=off"]
}

/// Splits QEMU's `a,b=c,d` option syntax, where `,,` stands for a literal comma.
fn split_options(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ',' if chars.peek() == Some(&',') => {
                chars.next();
                current.push(',');
            }
            ',' => parts.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    parts.push(current);
    parts
}

/// The `-qmp` argument for a monitor at `path` (commas in the path doubled, as QEMU wants).
fn monitor_arg(path: &Path) -> Result<String, LibvirtError> {
    let path = path
        .to_str()
        .ok_or_else(|| xml_error("the monitor path is not UTF-8"))?;
    Ok(format!(
        "unix:{},server=on,wait=off",
        path.replace(',', ",,")
    ))
}

/// The byte range of an element's content (between its start and end tags); for an empty
/// element written `<name/>`, an empty range would not exist, so the whole element is written
/// out again instead (the caller's text then goes between new tags).
fn inner_range(text: &str, node: Node<'_, '_>) -> Range<usize> {
    match node.first_child() {
        Some(first) => {
            let last = node.last_child().unwrap_or(first);
            first.range().start..last.range().end
        }
        None => {
            // `<name></name>` or `<name/>`: the content goes right before the end tag, if any.
            let element = &text[node.range()];
            match element.rfind("</") {
                Some(i) => node.range().start + i..node.range().start + i,
                None => node.range(),
            }
        }
    }
}

/// Where the end tag of the element spanning `range` starts: the last `<` inside the element,
/// since an element's end tag is the last markup in it.
fn end_tag_start(text: &str, range: Range<usize>) -> Result<usize, LibvirtError> {
    text[range.clone()]
        .rfind("</")
        .map(|i| range.start + i)
        .ok_or_else(|| xml_error("an element expected to have an end tag has none"))
}

/// Escapes text for use in element content or a single- or double-quoted attribute;
/// newlines and tabs as character references, so that an attribute keeps them through the
/// parser's normalisation.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WITH_MONITOR: &str =
        "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <uuid>de5ece71-717a-484e-93bc-d2440772ab33</uuid>
  <devices/>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/qtm/vm1.sock,server=on,wait=off'/>
  </qemu:commandline>
</domain>
";

    const PLAIN: &str = "<domain type='qemu'>
  <name>vm1</name>
  <devices/>
</domain>
";

    fn xml(s: &str) -> DomainXml {
        DomainXml::parse(s).expect("valid domain XML")
    }

    #[test]
    fn the_services_commandline_is_removed_and_nothing_else() {
        let brought_in = "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <devices/>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:/run/qemu-tls-migrate/libvirt/qtm-in-0123456789abcdef.sock,server=on,wait=off'/>
    <qemu:arg value='-incoming'/>
    <qemu:arg value='defer'/>
  </qemu:commandline>
</domain>
";
        let cleaned = xml(brought_in)
            .without_service_commandline()
            .expect("edit")
            .expect("found");

        assert_eq!(
            cleaned.as_str(),
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vm1</name>
  <devices/>
</domain>
"
        );
        // A monitor of the operator's own, or anything beside the service's arguments, stays.
        for kept in [
            WITH_MONITOR.to_string(),
            brought_in.replace("qtm-in-0123456789abcdef", "mine"),
            brought_in.replace(
                "<qemu:arg value='defer'/>",
                "<qemu:arg value='defer'/>\n    <qemu:arg value='-S'/>",
            ),
            PLAIN.to_string(),
        ] {
            assert!(
                xml(&kept)
                    .without_service_commandline()
                    .expect("edit")
                    .is_none(),
                "{kept}"
            );
        }
    }

    #[test]
    fn declared_monitor_is_found() {
        let m = xml(WITH_MONITOR).declared_monitor().expect("parse");
        assert_eq!(m.map(|m| m.path), Some(PathBuf::from("/run/qtm/vm1.sock")));
    }

    #[test]
    fn no_commandline_means_no_monitor() {
        assert_eq!(xml(PLAIN).declared_monitor().expect("parse"), None);
    }

    #[test]
    fn a_client_socket_or_a_tcp_monitor_is_not_a_declared_monitor() {
        let client = WITH_MONITOR.replace(",server=on,wait=off", "");
        assert_eq!(xml(&client).declared_monitor().expect("parse"), None);
        let tcp = WITH_MONITOR.replace("unix:/run/qtm/vm1.sock", "tcp:127.0.0.1:4444");
        assert_eq!(xml(&tcp).declared_monitor().expect("parse"), None);
    }

    #[test]
    fn another_prefix_for_the_qemu_namespace_is_understood() {
        let other = WITH_MONITOR
            .replace("qemu:", "q:")
            .replace("xmlns:qemu", "xmlns:q");
        let m = xml(&other).declared_monitor().expect("parse");
        assert_eq!(m.map(|m| m.path), Some(PathBuf::from("/run/qtm/vm1.sock")));
    }

    #[test]
    fn qemu_arg_outside_the_qemu_namespace_is_ignored() {
        let wrong_ns = WITH_MONITOR.replace("domain/qemu/1.0", "domain/other/1.0");
        assert_eq!(xml(&wrong_ns).declared_monitor().expect("parse"), None);
    }

    #[test]
    fn doubled_commas_in_the_path_are_one_comma() {
        let s = WITH_MONITOR.replace("/run/qtm/vm1.sock", "/run/a,,b.sock");
        let m = xml(&s).declared_monitor().expect("parse");
        assert_eq!(m.map(|m| m.path), Some(PathBuf::from("/run/a,b.sock")));
    }

    #[test]
    fn rename_and_drop_uuid_keep_the_rest() {
        let edited = xml(WITH_MONITOR)
            .with_name("vm<2>")
            .and_then(|x| x.without_uuid())
            .expect("edits");
        assert_eq!(edited.name().expect("name"), "vm<2>");
        assert_eq!(edited.uuid().expect("uuid"), None);
        assert!(edited.as_str().contains("<name>vm&lt;2&gt;</name>"));
        assert_eq!(
            edited.declared_monitor().expect("monitor"),
            xml(WITH_MONITOR).declared_monitor().expect("monitor")
        );
    }

    #[test]
    fn with_monitor_moves_a_declared_monitor() {
        let moved = xml(WITH_MONITOR)
            .with_monitor(Path::new("/other/dir/x.sock"))
            .expect("edit");
        assert_eq!(
            moved.declared_monitor().expect("monitor").map(|m| m.path),
            Some(PathBuf::from("/other/dir/x.sock"))
        );
        assert_eq!(moved.as_str().matches("-qmp").count(), 1);
    }

    #[test]
    fn with_monitor_adds_a_commandline_with_its_namespace() {
        let added = xml(PLAIN)
            .with_monitor(Path::new("/run/qtm/new.sock"))
            .expect("edit");
        assert_eq!(
            added.declared_monitor().expect("monitor").map(|m| m.path),
            Some(PathBuf::from("/run/qtm/new.sock"))
        );
    }

    #[test]
    fn qemu_args_are_appended_to_an_existing_commandline() {
        let more = xml(WITH_MONITOR)
            .with_qemu_args(&["-incoming", "defer"])
            .expect("edit");
        let doc = more.doc().expect("parse");
        let args: Vec<&str> = qemu_args(doc.root_element())
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            args,
            [
                "-qmp",
                "unix:/run/qtm/vm1.sock,server=on,wait=off",
                "-incoming",
                "defer"
            ]
        );
    }

    #[test]
    fn qemu_args_fill_an_empty_commandline_element() {
        let empty = WITH_MONITOR.replace(
            "<qemu:commandline>\n    <qemu:arg value='-qmp'/>\n    <qemu:arg value='unix:/run/qtm/vm1.sock,server=on,wait=off'/>\n  </qemu:commandline>",
            "<qemu:commandline/>",
        );
        let filled = xml(&empty).with_qemu_args(&["-S"]).expect("edit");
        let doc = filled.doc().expect("parse");
        let args: Vec<&str> = qemu_args(doc.root_element())
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        assert_eq!(args, ["-S"]);
    }

    const DISKS: &str = "<domain type='qemu'>
  <name>vm1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/images/root.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
  </devices>
</domain>
";

    #[test]
    fn disks_are_read_with_target_file_and_format() {
        let disks = xml(DISKS).disks().expect("disks");
        assert_eq!(
            disks,
            [
                DiskSpec {
                    target: "vda".into(),
                    device: "disk".into(),
                    file: Some("/var/lib/images/root.qcow2".into()),
                    format: Some("qcow2".into()),
                    readonly: false,
                    alias: None,
                },
                DiskSpec {
                    target: "hdc".into(),
                    device: "cdrom".into(),
                    file: None,
                    format: None,
                    readonly: true,
                    alias: None,
                },
            ]
        );
    }

    #[test]
    fn with_disk_file_changes_only_that_disk() {
        let moved = xml(DISKS)
            .with_disk_file("vda", Path::new("/elsewhere/a'b.qcow2"))
            .expect("edit");
        let disks = moved.disks().expect("disks");
        assert_eq!(disks[0].file, Some(PathBuf::from("/elsewhere/a'b.qcow2")));
        assert_eq!(disks[1], xml(DISKS).disks().expect("disks")[1]);
        assert!(matches!(
            xml(DISKS).with_disk_file("vdz", Path::new("/x")),
            Err(LibvirtError::Xml { .. })
        ));
    }

    #[test]
    fn not_a_domain_is_refused() {
        assert!(matches!(
            DomainXml::parse("<network><name>x</name></network>"),
            Err(LibvirtError::Xml { .. })
        ));
        assert!(matches!(
            DomainXml::parse("<domain><name>x</name>"),
            Err(LibvirtError::XmlParse { .. })
        ));
    }
}
