//! libvirt domains as migration endpoints.
//!
//! CloudStack's VMs are libvirt domains: libvirtd starts and owns their QEMU processes. This
//! layer is what the rest of the tool needs of libvirt, and nothing more:
//! 1. [`Libvirt::connect`] to a URI ([`DEFAULT_URI`], `qemu:///system`, unless told otherwise);
//! 2. [`Libvirt::domain`] looks a domain up by name ([`LibvirtError::NoSuchDomain`] names it);
//! 3. [`Domain::state`] and [`Domain::job_active`] say whether it may be migrated now;
//! 4. [`Domain::migratable_xml`] is `virsh dumpxml --migratable`, and
//!    [`Domain::declared_monitor`] the QMP socket its `<qemu:commandline>` declares for this
//!    tool (see [`xml`]), which is how the tool reaches QEMU besides libvirt's own monitor;
//! 5. [`Libvirt::create_paused`] starts a transient domain paused (`virsh create --paused`),
//!    [`Domain::resume`] and [`Domain::destroy`] do what `virsh resume`/`destroy` do.
//!
//! ## Why the `virt` crate
//! libvirt's official Rust bindings (`virt`, libvirt-rust) call libvirt's C library, so this
//! layer gets libvirt's own error codes (no such domain, operation invalid) rather than parsing
//! `virsh`'s messages, needs no `virsh` binary, and makes one connection for many calls. We use
//! `virt` 0.4.3: 0.5.0 pins `libc` to `=0.2.183`, which conflicts with the `libc` that `nix`
//! 0.31.3 requires. `virt-sys` ships pre-generated bindings (libvirt >= 6.0 API), so building
//! needs only `libvirt.so` and `pkg-config` (Debian: `libvirt-dev`, `pkg-config`, both installed
//! by `scripts/setup.sh`), not clang; it is checked against Debian 12's libvirt 9.0. Without
//! `libvirt-dev` the final link fails, so there is no cargo feature to build without libvirt:
//! every machine this tool runs on (a CloudStack KVM host) has `libvirt0` anyway.
//!
//! ## Blocking
//! Every call here is a synchronous RPC to libvirtd (the C library has no async API, and no
//! timeout of its own while no event loop runs keepalives). Async callers run them in
//! `tokio::task::spawn_blocking` and put their own timeout around it.
//!
//! libvirt's default error handler prints every error to stderr; [`Libvirt::connect`] replaces
//! it with one that prints nothing, since errors come back as [`LibvirtError`] values (and
//! `--json` runs must write nothing but JSON).

pub mod passthrough;
pub mod xml;

use std::path::PathBuf;

use virt::connect::Connect;
use virt::error::ErrorNumber;
use virt::sys;

pub use passthrough::Passthrough;
pub use xml::{DeclaredMonitor, DiskSpec, DomainXml, QEMU_NS};

/// The URI of the local system libvirtd's QEMU driver, as CloudStack's agent uses it.
pub const DEFAULT_URI: &str = "qemu:///system";

/// What went wrong with libvirt. Each variant names the URI or domain concerned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: is libvirtd running, and may this user use it?")]
    Connect {
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("no domain named {name:?} on {uri}")]
    NoSuchDomain { name: String, uri: String },
    #[error("libvirt failed to {action} domain {name:?} on {uri}")]
    Domain {
        action: &'static str,
        name: String,
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("libvirt refused to start domain {name:?} from its XML on {uri}")]
    Create {
        name: String,
        uri: String,
        #[source]
        source: virt::error::Error,
    },
    #[error("domain XML is not well-formed")]
    XmlParse {
        #[source]
        source: roxmltree::Error,
    },
    #[error("domain XML: {reason}")]
    Xml { reason: String },
    #[error("QMP through libvirt's passthrough to domain {name:?}: {reason}")]
    Passthrough { name: String, reason: String },
    #[error("cannot start libvirt's event loop: {reason}")]
    EventLoop { reason: String },
    #[error("libvirt at {uri} failed to {action}")]
    Host {
        action: &'static str,
        uri: String,
        #[source]
        source: virt::error::Error,
    },
}

/// A domain's run state as libvirt reports it (`virsh domstate`), with libvirt's reason code
/// for it (`virsh domstate --reason`; the meaning depends on the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    pub kind: StateKind,
    pub reason: i32,
}

/// libvirt's `virDomainState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StateKind {
    NoState,
    Running,
    Blocked,
    Paused,
    ShuttingDown,
    Shutoff,
    Crashed,
    PmSuspended,
    /// A state this build of the bindings does not know.
    Other(u32),
}

impl StateKind {
    fn from_raw(raw: sys::virDomainState) -> StateKind {
        match raw {
            sys::VIR_DOMAIN_NOSTATE => StateKind::NoState,
            sys::VIR_DOMAIN_RUNNING => StateKind::Running,
            sys::VIR_DOMAIN_BLOCKED => StateKind::Blocked,
            sys::VIR_DOMAIN_PAUSED => StateKind::Paused,
            sys::VIR_DOMAIN_SHUTDOWN => StateKind::ShuttingDown,
            sys::VIR_DOMAIN_SHUTOFF => StateKind::Shutoff,
            sys::VIR_DOMAIN_CRASHED => StateKind::Crashed,
            sys::VIR_DOMAIN_PMSUSPENDED => StateKind::PmSuspended,
            other => StateKind::Other(other),
        }
    }

    /// The word `virsh domstate` prints for this state.
    pub fn as_str(self) -> &'static str {
        match self {
            StateKind::NoState => "nostate",
            StateKind::Running => "running",
            StateKind::Blocked => "idle",
            StateKind::Paused => "paused",
            StateKind::ShuttingDown => "in shutdown",
            StateKind::Shutoff => "shut off",
            StateKind::Crashed => "crashed",
            StateKind::PmSuspended => "pmsuspended",
            StateKind::Other(_) => "unknown",
        }
    }
}

impl std::fmt::Display for StateKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One connection to a libvirt daemon; closed on drop.
#[derive(Debug)]
pub struct Libvirt {
    conn: Connect,
    uri: String,
}

impl Libvirt {
    /// Opens a read-write connection to `uri` (e.g. [`DEFAULT_URI`], or
    /// `qemu+unix:///system?socket=PATH` for a daemon whose socket is elsewhere).
    pub fn connect(uri: &str) -> Result<Libvirt, LibvirtError> {
        virt::error::clear_error_callback();
        let conn = Connect::open(Some(uri)).map_err(|source| LibvirtError::Connect {
            uri: uri.to_string(),
            source,
        })?;
        tracing::debug!(uri, "connected to libvirt");
        Ok(Libvirt {
            conn,
            uri: uri.to_string(),
        })
    }

    /// The URI this connection was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The domain named `name`, active or only defined.
    pub fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        match virt::domain::Domain::lookup_by_name(&self.conn, name) {
            Ok(dom) => Ok(Domain {
                dom,
                name: name.to_string(),
                uri: self.uri.clone(),
            }),
            Err(e) if e.code() == ErrorNumber::NoDomain => Err(LibvirtError::NoSuchDomain {
                name: name.to_string(),
                uri: self.uri.clone(),
            }),
            Err(source) => Err(LibvirtError::Domain {
                action: "look up",
                name: name.to_string(),
                uri: self.uri.clone(),
                source,
            }),
        }
    }

    /// The domain whose UUID is `uuid`, if there is one.
    pub fn domain_by_uuid(&self, uuid: &str) -> Result<Option<Domain>, LibvirtError> {
        if uuid.contains('\0') {
            return Ok(None);
        }
        match virt::domain::Domain::lookup_by_uuid_string(&self.conn, uuid) {
            Ok(dom) => {
                let name = dom.get_name().unwrap_or_else(|_| uuid.to_string());
                Ok(Some(Domain {
                    dom,
                    name,
                    uri: self.uri.clone(),
                }))
            }
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(source) => Err(LibvirtError::Domain {
                action: "look up by UUID",
                name: uuid.to_string(),
                uri: self.uri.clone(),
                source,
            }),
        }
    }

    /// The emulators this libvirt offers (each `<emulator>` of its capabilities), the one an
    /// incoming domain may name.
    pub fn emulators(&self) -> Result<Vec<String>, LibvirtError> {
        let caps = self
            .conn
            .get_capabilities()
            .map_err(|source| LibvirtError::Host {
                action: "report its capabilities",
                uri: self.uri.clone(),
                source,
            })?;
        let doc = roxmltree::Document::parse(&caps)
            .map_err(|source| LibvirtError::XmlParse { source })?;
        let mut emulators: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("emulator"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect();
        emulators.sort();
        emulators.dedup();
        Ok(emulators)
    }

    /// Whether a libvirt network named `name` exists here and is active.
    pub fn network_active(&self, name: &str) -> Result<bool, LibvirtError> {
        if name.contains('\0') {
            return Ok(false);
        }
        match virt::network::Network::lookup_by_name(&self.conn, name) {
            Ok(net) => net.is_active().map_err(|source| LibvirtError::Host {
                action: "check a network",
                uri: self.uri.clone(),
                source,
            }),
            Err(e) if e.code() == ErrorNumber::NoNetwork => Ok(false),
            Err(source) => Err(LibvirtError::Host {
                action: "look up a network",
                uri: self.uri.clone(),
                source,
            }),
        }
    }

    /// Starts a transient domain from `xml` with its CPUs paused (`virsh create --paused`):
    /// libvirt shows it `paused (user)` until [`Domain::resume`]; gone once destroyed.
    pub fn create_paused(&self, xml: &DomainXml) -> Result<Domain, LibvirtError> {
        let name = xml.name()?;
        // `DomainXml::parse` refused NUL bytes, on which the bindings would panic.
        let dom = virt::domain::Domain::create_xml(
            &self.conn,
            xml.as_str(),
            sys::VIR_DOMAIN_START_PAUSED,
        )
        .map_err(|source| LibvirtError::Create {
            name: name.clone(),
            uri: self.uri.clone(),
            source,
        })?;
        tracing::info!(domain = %name, uri = %self.uri, "started domain paused");
        Ok(Domain {
            dom,
            name,
            uri: self.uri.clone(),
        })
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        // Domains looked up through this connection hold their own reference to it.
        if let Err(e) = self.conn.close() {
            tracing::debug!(uri = %self.uri, error = %e, "closing the libvirt connection failed");
        }
    }
}

/// A libvirt domain, looked up or created through a [`Libvirt`] connection.
#[derive(Debug)]
pub struct Domain {
    dom: virt::domain::Domain,
    name: String,
    uri: String,
}

impl Domain {
    /// The domain's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The domain's UUID, in its usual text form.
    pub fn uuid(&self) -> Result<String, LibvirtError> {
        self.dom
            .get_uuid_string()
            .map_err(|e| self.error("read the UUID of", e))
    }

    /// Its run state (`virsh domstate --reason`).
    pub fn state(&self) -> Result<DomainState, LibvirtError> {
        let (state, reason) = self
            .dom
            .get_state()
            .map_err(|e| self.error("read the state of", e))?;
        Ok(DomainState {
            kind: StateKind::from_raw(state),
            reason,
        })
    }

    /// Whether the domain runs (has a QEMU process): any state but shut off.
    pub fn is_active(&self) -> Result<bool, LibvirtError> {
        self.dom
            .is_active()
            .map_err(|e| self.error("check the activity of", e))
    }

    /// Whether libvirt has a background job running on the (active) domain: a migration, save,
    /// dump or backup (`virsh domjobinfo` not `None`). False for an inactive domain.
    pub fn job_active(&self) -> Result<bool, LibvirtError> {
        if !self.is_active()? {
            return Ok(false);
        }
        let job = self
            .dom
            .get_job_info()
            .map_err(|e| self.error("read the job of", e))?;
        Ok(job.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
    }

    /// The domain's XML as for a migration (`virsh dumpxml --migratable`).
    pub fn migratable_xml(&self) -> Result<DomainXml, LibvirtError> {
        let text = self
            .dom
            .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
            .map_err(|e| self.error("read the XML of", e))?;
        DomainXml::parse(text)
    }

    /// The domain's XML as libvirt runs it now (`virsh dumpxml`: device aliases included).
    pub fn live_xml(&self) -> Result<DomainXml, LibvirtError> {
        let text = self
            .dom
            .get_xml_desc(0)
            .map_err(|e| self.error("read the XML of", e))?;
        DomainXml::parse(text)
    }

    /// The QMP socket the domain's `<qemu:commandline>` declares, if any.
    pub fn declared_monitor(&self) -> Result<Option<PathBuf>, LibvirtError> {
        Ok(self.live_xml()?.declared_monitor()?.map(|m| m.path))
    }

    /// Sends one QMP command (a JSON object, without `id`) on libvirt's own monitor of the
    /// domain (`virsh qemu-monitor-command`) and returns QEMU's reply as text, an error reply
    /// included. libvirt taints the domain `custom-monitor`.
    pub fn monitor_command(&self, command: &str) -> Result<String, LibvirtError> {
        if command.contains('\0') {
            // The bindings would panic on it.
            return Err(self.refused("a command with a NUL byte"));
        }
        self.dom
            .qemu_monitor_command(command, 0)
            .map_err(|e| self.error("pass a QMP command to", e))
    }

    /// [`Domain::monitor_command`] with file descriptors passed to QEMU alongside the command
    /// (`virDomainQemuMonitorCommandWithFiles`, libvirt 8.2+), as `getfd` takes one. libvirt
    /// sends its own duplicates; the caller's stay open.
    pub fn monitor_command_with_files(
        &self,
        command: &str,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<String, LibvirtError> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let Ok(cmd) = std::ffi::CString::new(command) else {
            return Err(self.refused("a command with a NUL byte"));
        };
        let mut infiles: Vec<std::ffi::c_int> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let Ok(ninfiles) = std::ffi::c_uint::try_from(infiles.len()) else {
            return Err(self.refused("too many file descriptors"));
        };
        let mut noutfiles: std::ffi::c_uint = 0;
        let mut outfiles: *mut std::ffi::c_int = std::ptr::null_mut();
        let mut result: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; libvirt allocates `result` and
        // `outfiles`, freed below.
        let ret = unsafe {
            sys::virDomainQemuMonitorCommandWithFiles(
                self.dom.as_ptr(),
                cmd.as_ptr(),
                ninfiles,
                infiles.as_mut_ptr(),
                &mut noutfiles,
                &mut outfiles,
                &mut result,
                0,
            )
        };
        if ret == -1 {
            return Err(self.error(
                "pass a QMP command with a file descriptor to",
                virt::error::Error::last_error(),
            ));
        }
        if !outfiles.is_null() {
            // QEMU's commands here return none; any that came are closed, not leaked.
            for i in 0..noutfiles as usize {
                // SAFETY: libvirt returned `noutfiles` descriptors, now ours.
                drop(unsafe { OwnedFd::from_raw_fd(*outfiles.add(i)) });
            }
            // SAFETY: allocated by libvirt with malloc.
            unsafe { nix::libc::free(outfiles.cast()) };
        }
        if result.is_null() {
            return Ok(String::new());
        }
        // SAFETY: a NUL-terminated string libvirt allocated with malloc.
        let text = unsafe { std::ffi::CStr::from_ptr(result) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as above.
        unsafe { nix::libc::free(result.cast()) };
        Ok(text)
    }

    /// Resumes its CPUs through libvirt (`virsh resume`), so libvirt's state is `running`.
    pub fn resume(&self) -> Result<(), LibvirtError> {
        self.dom.resume().map_err(|e| self.error("resume", e))?;
        tracing::info!(domain = %self.name, uri = %self.uri, "resumed domain");
        Ok(())
    }

    /// Kills its QEMU process (`virsh destroy`); a transient domain is then gone.
    pub fn destroy(&self) -> Result<(), LibvirtError> {
        self.dom.destroy().map_err(|e| self.error("destroy", e))?;
        tracing::info!(domain = %self.name, uri = %self.uri, "destroyed domain");
        Ok(())
    }

    /// A command the passthrough will not send to this domain, and why.
    fn refused(&self, reason: &str) -> LibvirtError {
        LibvirtError::Passthrough {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    fn error(&self, action: &'static str, source: virt::error::Error) -> LibvirtError {
        LibvirtError::Domain {
            action,
            name: self.name.clone(),
            uri: self.uri.clone(),
            source,
        }
    }
}
