//! `qemu-tls-migrate migrate`: its arguments, the options they make, the libvirt domain
//! lookup, and the run (the job, the result file, `--destroy-source`).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use qemu_tls_migrate::addr::Address;
use qemu_tls_migrate::migration::{
    self, DiskSelection, Endpoint, FinalStatus, MigrationOptions, RemoteTarget, Report, SourceEnd,
    UNLIMITED_BANDWIDTH, ValidOptions,
};
use qemu_tls_migrate::peer::{Authz, DiskCopy};
use qemu_tls_migrate::pki::DEFAULT_PKI_DIR;
use qemu_tls_migrate::qemu::CopyMode;

use crate::jobs_cmd::RunningJob;
use crate::outcome::{Outcome, outcome_of};
use crate::output::{print_report, print_report_job};
use crate::parse::{absolute_dir, parse_bandwidth, parse_disk};
use crate::running::run_migration_to;
use crate::tuning::TuningArgs;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MirrorModeArg {
    Background,
    WriteBlocking,
}

#[derive(Debug, Args)]
#[command(
    long_about = "Live-migrate a running QEMU VM to a QEMU started with `-incoming defer`, over \
QEMU-native TLS, by talking QMP to both.\n\n\
Per migration the tool creates tls-creds-x509 objects from each side's PKI directory (client on \
the source, server on the destination, peer verification on), sets tls-creds and tls-hostname, \
picks a port from 49152-49215, migrates, resumes the destination, and then removes every object \
it created and puts the migration capabilities and parameters back as they were. On any failure \
(bad certificates, dead destination, timeout, Ctrl-C) the destination is shut down and the source \
keeps running, with one exception: once the source has passed the switch-over, it is resumed \
only if the destination is known not to run the VM; otherwise it stays paused and the error \
(kind split-brain-risk, exit 1) says where the VM may run. The VM never runs on both hosts.\n\n\
A side is *secured* when its PKI directory holds a usable ca-cert.pem and, for the source, \
client-cert.pem/client-key.pem, for the destination, server-cert.pem/server-key.pem \
(see `qemu-tls-migrate pki check`); *unsecured* when it holds no TLS file at all; files that \
fail the checks make it *broken*, which is refused (exit 3), never downgraded to plain TCP.\n\n\
Every writable local disk must be copied (--disk, --all-local-disks) or declared shared \
(--shared-disk); otherwise the migration is refused (exit 3) naming the disk.",
    after_help = "Example (two QEMUs on this host, modelling two hosts):\n  \
qemu-tls-migrate migrate --source-qmp /run/vm1/qmp.sock --dest-qmp /run/vm1-in/qmp.sock \\\n    \
--dest-host host-b --dest-address 127.0.0.1 --source-pki-dir /etc/pki/host-a \\\n    \
--dest-pki-dir /etc/pki/host-b --json\n\n\
Block migration of a VM on local storage (the destination started with empty disks of the same \
node names and sizes):\n  \
qemu-tls-migrate migrate --source-qmp ... --dest-qmp ... --dest-host host-b --all-local-disks\n\n\
While it runs, `qemu-tls-migrate jobs` lists it, and `jobs cancel ID`, `jobs set ID \
--max-bandwidth RATE --downtime-limit MS` and `jobs pause ID` control it from any process of \
this user (ID: --job-id, or \"job\" in the JSON progress lines; see `jobs --help`).\n\n\
Exit codes: 0 completed, 1 migration failed (rolled back; or split-brain-risk: source left \
paused), 2 bad command line, 3 refused before anything was changed on either side, 4 cancelled by SIGINT, SIGTERM, SIGHUP, SIGQUIT or `jobs cancel` (rolled back; a second signal \
during the rollback does not interrupt it), 5 completed (the guest runs on the destination) but \
--destroy-source failed: the source's copy is left paused (\"source_end\" says why).\n\
With --json, stdout carries one object: {\"status\": \"completed\"|\"failed\"|\"cancelled\", \
\"transport\": \"tls\"|\"tcp\", \"ram\": {\"bytes\", \"total_ms\", \"downtime_ms\", \
\"throughput_mbps\", ...}, \"error\": {\"kind\", \"message\"} (on failure), \"source_end\": {\"domain\", \"destroyed\", \"error\"} (with \
--destroy-source, after completion)}."
)]
pub struct MigrateArgs {
    /// QMP socket of the running source QEMU.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "domain",
        conflicts_with = "domain"
    )]
    pub source_qmp: Option<PathBuf>,
    /// Migrate this libvirt domain (instead of --source-qmp): it must be running or paused, with
    /// no libvirt job on it. The tool uses the QMP monitor the domain declares in its
    /// <qemu:commandline> (-qmp unix:PATH,server=on,wait=off) beside libvirt's own, or, when it
    /// declares none, libvirt's QMP passthrough (the report's "source_qmp" says which). Name
    /// its disks by target (--disk vda).
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// libvirt URI for --domain.
    #[arg(long, value_name = "URI", default_value = qemu_tls_migrate::libvirt::DEFAULT_URI)]
    pub connect: String,
    /// With --domain and --to a service started with --libvirt: the incoming domain's XML (the
    /// source's `virsh dumpxml --migratable`, rewritten: disk paths, VNC address). Default:
    /// the source's migratable XML as it is. The service creates the disks to be copied at the
    /// paths this XML names, and never overwrites an existing file.
    #[arg(long, value_name = "FILE", requires = "domain", requires = "to")]
    pub dest_xml: Option<PathBuf>,
    /// With --domain and --to a service started with --libvirt: a disk to be copied whose path
    /// (in --dest-xml) already exists on the destination is used, not refused: a volume
    /// CloudStack's management server created there for this migration. The service checks
    /// it first: inside its --storage-dir, a regular file no process has open and no QEMU
    /// holds locked, an empty image of the source's format and at least its virtual size
    /// (smaller only with --create-dest-disks, then grown), an overlay on a local template for
    /// a top-only copy and without backing file for a full one. An adopted file is never
    /// deleted, not even by a roll-back.
    #[arg(long, requires = "domain", requires = "to")]
    pub adopt_dest_disks: bool,
    /// With --domain: after the destination confirmed it runs the VM, destroy the source
    /// domain (`virsh destroy`; its definition and disks stay, for the caller to clean up).
    /// Without it the source is left paused. The result's "source_end" says whether it was
    /// destroyed; when not, the migration still completed but the exit code is 5.
    #[arg(long, requires = "domain", conflicts_with = "dest_paused")]
    pub destroy_source: bool,
    /// QMP socket of the destination QEMU (started with -incoming defer). With --to: the
    /// socket's file name in the destination service's --qmp-dir. Not needed with --domain and
    /// --to, where the service (started with --libvirt) makes the incoming domain itself.
    #[arg(long, value_name = "PATH|NAME", required_unless_present_all = ["domain", "to"])]
    pub dest_qmp: Option<PathBuf>,
    /// Migrate to another host through its `qemu-tls-migrate serve` (default port 16515); the
    /// control channel uses mutual TLS with this host's --source-pki-dir/--pki-dir.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub to: Option<Address>,
    /// Make the destination accept only this source's certificate: an authz-simple object
    /// matching its distinguished name, set as tls-authz for the migration stream and NBD.
    #[arg(long)]
    pub authz: bool,
    /// The destination host's name: its certificate must carry it (see --tls-hostname), and
    /// the destination listens on it unless --dest-address is given.
    #[arg(long, value_name = "NAME")]
    pub dest_host: String,
    /// Address the destination listens on and the source connects to (default: --dest-host).
    #[arg(long, value_name = "ADDR")]
    pub dest_address: Option<String>,
    /// The name checked against the destination's certificate (default: --dest-host).
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,
    /// PKI directory for both sides (QEMU's layout: ca-cert.pem, server-*.pem, client-*.pem).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_PKI_DIR)]
    pub pki_dir: PathBuf,
    /// PKI directory of the source only (overrides --pki-dir).
    #[arg(long, value_name = "DIR")]
    pub source_pki_dir: Option<PathBuf>,
    /// PKI directory of the destination only (overrides --pki-dir).
    #[arg(long, value_name = "DIR")]
    pub dest_pki_dir: Option<PathBuf>,
    /// CloudStack's agent directory on this host: when it holds cloud.crt, the PKI directory
    /// handed to QEMU must hold its current certificates (a stale copy after a renewal is
    /// refreshed when run as root with `host secure`'s layout, else refused), and
    /// --transport auto refuses when CloudStack and the PKI check disagree on "secured".
    #[arg(long, value_name = "DIR", default_value = qemu_tls_migrate::host::DEFAULT_CLOUDSTACK_DIR)]
    pub cloudstack_dir: PathBuf,
    /// Do not check the PKI directories against CloudStack's certificates.
    #[arg(long)]
    pub no_cloudstack_check: bool,
    /// HOST:PORT the source connects to when it differs from where the destination listens
    /// (NAT, port forwarding, a proxy).
    #[arg(long, value_name = "HOST:PORT", hide = true)]
    pub source_connect: Option<Address>,
    /// Leave the destination paused after the migration (like virsh migrate --suspend).
    #[arg(long)]
    pub dest_paused: bool,
    /// Only forecast: sample the source guest's dirty rate and RAM, predict total time, passes
    /// and downtime with these settings, say go or no-go with the settings that would make it
    /// converge, and change nothing. Exit 0: it converges; 3: it will not as configured.
    #[arg(long)]
    pub plan: bool,
    /// Copy this disk to the destination over NBD before RAM moves: its block node name (as in
    /// -blockdev node-name=...) or its device id (-device ...,id=); with --domain, its target
    /// as in the domain's XML (vda). Repeat for several disks. ",copy=top" or ",copy=full"
    /// overrides --disk-copy for this disk.
    #[arg(
        long = "disk",
        value_name = "NODE[,copy=top|full]",
        conflicts_with = "all_local_disks",
        value_parser = parse_disk
    )]
    pub disks: Vec<(String, Option<DiskCopy>)>,
    /// full: copy each disk's whole backing chain (what the guest sees); top: only its top
    /// image (libvirt's --copy-storage-inc), for a qcow2 overlay on a template that the
    /// destination already has: its disk must be an overlay on a backing file of the same
    /// format, size and content (checked before anything starts; exit 3 otherwise). A disk
    /// without a backing file is copied whole (unless named with ,copy=top: then refused).
    #[arg(long, value_enum, default_value = "full")]
    pub disk_copy: DiskCopyArg,
    /// Cap of each disk's copy in bytes per second (the mirror's speed; K/M/G suffixes as
    /// --max-bandwidth; 0 or "unlimited": no cap). Zeroes do not count. Default: no cap.
    #[arg(long, value_name = "RATE", value_parser = parse_bandwidth)]
    pub disk_bandwidth: Option<u64>,
    /// skip: blocks of zeroes cross the wire as NBD write-zeroes requests and stay sparse on the
    /// destination (detect-zeroes=unmap on the source's NBD client); copy: sent as data.
    #[arg(long, value_enum, default_value = "skip")]
    pub disk_zeroes: DiskZeroesArg,
    /// HOST:PORT the source's NBD clients connect to when it differs from where the
    /// destination's NBD server listens (NAT, a proxy).
    #[arg(long, value_name = "HOST:PORT", hide = true)]
    pub nbd_connect: Option<Address>,
    /// Copy every writable disk that is not on shared storage. Shared means a network driver
    /// (nbd, rbd, iscsi, gluster, ssh, http...) or a file on NFS, CIFS/SMB, Ceph, FUSE
    /// (GlusterFS), GFS2, OCFS2 or Lustre, as statfs reports for the image's path.
    #[arg(long)]
    pub all_local_disks: bool,
    /// background: guest writes during the copy are sent later from a dirty bitmap;
    /// write-blocking: guest writes wait for the destination, so a guest that writes faster
    /// than the network still converges.
    #[arg(long, value_enum, default_value = "background")]
    pub mirror_mode: MirrorModeArg,
    /// With --adopt-dest-disks: a volume smaller than the source's disk is grown to its size
    /// (qemu-img resize, by the service, before the destination QEMU opens it). A destination
    /// QEMU already waiting for the migration cannot resize its disks (QEMU 7.2 aborts, 10.0
    /// refuses): grow those with qemu-img resize before starting it.
    #[arg(long, requires = "adopt_dest_disks")]
    pub create_dest_disks: bool,
    /// Declare this writable local disk (named as for --disk) shared: reachable from the
    /// destination by other means, so it is not copied. Repeat for several. Without it, a
    /// writable disk that is not on shared storage and not copied is refused (exit 3).
    #[arg(long = "shared-disk", value_name = "NODE")]
    pub shared_disks: Vec<String>,
    /// Migrate even when writable local disks are neither copied nor declared shared: the
    /// guest then runs on the destination without their contents (libvirt's --unsafe).
    #[arg(long = "unsafe")]
    pub allow_unsafe: bool,
    /// This migration's job id for `qemu-tls-migrate jobs` (1 to 64 letters, digits, '.', '_',
    /// '-', not starting with '.'). Default: with --domain, the domain's name (CloudStack's
    /// vmName, e.g. i-2-3-VM: `jobs cancel i-2-3-VM`) when it is a valid id; otherwise 8 random
    /// hexadecimal digits. An id in use is refused (for the domain's name: as another run
    /// migrating that domain, kind busy).
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Also write the final JSON object to this file (atomically: a temporary file renamed into
    /// place), so the result survives whatever the caller does with stdout and stderr.
    #[arg(long, value_name = "FILE")]
    pub result_file: Option<PathBuf>,
    #[command(flatten)]
    pub tuning: TuningArgs,
}

impl MigrateArgs {
    pub fn options(&self) -> anyhow::Result<MigrationOptions> {
        let source = Endpoint {
            // With --domain, filled in from libvirt before the migration starts.
            qmp: self.source_qmp.clone().unwrap_or_default(),
            pki_dir: absolute_dir(self.source_pki_dir.as_ref().unwrap_or(&self.pki_dir))?,
        };
        let dest = Endpoint {
            qmp: self.dest_qmp.clone().unwrap_or_default(),
            pki_dir: absolute_dir(self.dest_pki_dir.as_ref().unwrap_or(&self.pki_dir))?,
        };
        let mut o = MigrationOptions::new(source, dest, &self.dest_host);
        let cloudstack = (!self.no_cloudstack_check).then(|| self.cloudstack_dir.clone());
        o.source_cloudstack_dir = cloudstack.clone();
        o.dest_cloudstack_dir = cloudstack;
        o.dest_address = self.dest_address.clone();
        o.tls_hostname = self.tls_hostname.clone();
        o.source_connect = self.source_connect.clone();
        o.dest_paused = self.dest_paused;
        let mut nodes = Vec::new();
        o.disk_copy.default = self.disk_copy.into();
        for (node, copy) in &self.disks {
            if let Some(copy) = copy {
                o.disk_copy.per_node.insert(node.clone(), *copy);
            }
            nodes.push(node.clone());
        }
        o.disks = if self.all_local_disks {
            DiskSelection::AllLocal
        } else if nodes.is_empty() {
            DiskSelection::None
        } else {
            DiskSelection::Nodes(nodes)
        };
        o.disk_bandwidth = self.disk_bandwidth.filter(|b| *b != UNLIMITED_BANDWIDTH);
        o.skip_zeroes = self.disk_zeroes == DiskZeroesArg::Skip;
        o.nbd_connect = self.nbd_connect.clone();
        o.mirror_mode = match self.mirror_mode {
            MirrorModeArg::Background => CopyMode::Background,
            MirrorModeArg::WriteBlocking => CopyMode::WriteBlocking,
        };
        o.create_dest_disks = self.create_dest_disks;
        o.shared_disks = self.shared_disks.clone();
        o.allow_unsafe = self.allow_unsafe;
        if let Some(to) = &self.to {
            // The migration and NBD ports are on the host the service runs on.
            if o.dest_address.is_none() {
                o.dest_address = Some(to.host.clone());
            }
            if self.authz {
                // The service fills in the source certificate's name from the TLS session.
                o.authz = Authz::FromPeerCert;
            }
        } else if self.authz {
            o.authz = Authz::Identity(client_dn(&o.source.pki_dir)?);
        }
        self.tuning.apply(&mut o);
        Ok(o)
    }
}

/// The distinguished name of the client certificate in `pki_dir` (what `authz-simple` on the
/// destination must match).
fn client_dn(pki_dir: &std::path::Path) -> anyhow::Result<String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let path = pki_dir.join(qemu_tls_migrate::pki::CLIENT_CERT);
    let der = CertificateDer::from_pem_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "--authz needs the source's certificate {}: {e}",
            path.display()
        )
    })?;
    qemu_tls_migrate::pki::certificate_authz_dn(der.as_ref()).map_err(|e| {
        anyhow::anyhow!(
            "--authz: the subject of {} cannot be QEMU's tls-authz identity: {e}",
            path.display()
        )
    })
}

/// `--disk-copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskCopyArg {
    Full,
    Top,
}

impl From<DiskCopyArg> for DiskCopy {
    fn from(a: DiskCopyArg) -> DiskCopy {
        match a {
            DiskCopyArg::Full => DiskCopy::Full,
            DiskCopyArg::Top => DiskCopy::Top,
        }
    }
}

/// `--disk-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DiskZeroesArg {
    Skip,
    Copy,
}

/// The directory `--result-file` names a file in.
fn result_dir(path: &std::path::Path) -> &std::path::Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    }
}

/// Proves a result file can be written at `path`, changing nothing there.
fn check_result_file(path: &std::path::Path) -> Result<(), String> {
    let dir = result_dir(path);
    tempfile::NamedTempFile::new_in(dir).map_err(|e| {
        format!(
            "--result-file {}: cannot write in {}: {e}; name a file in a writable directory",
            path.display(),
            dir.display()
        )
    })?;
    Ok(())
}

/// Writes `result` to `path` through a temporary file in the same directory, renamed into
/// place, so a reader never sees half a result.
fn write_result_file(path: &std::path::Path, result: &serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let dir = result_dir(path);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| anyhow::anyhow!("--result-file: cannot write in {}: {e}", dir.display()))?;
    writeln!(tmp, "{result}")?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("--result-file {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Looks the source domain up (refusing one that cannot move), names its disks for QEMU (a
/// domain's disks are named as in its XML, `vda`; QEMU knows them by device id), and, with
/// `--to`, makes the request for the incoming domain: its XML and the disks to create.
async fn resolve_domain(
    args: &MigrateArgs,
    name: &str,
    dest_xml: Option<String>,
    options: &mut MigrationOptions,
) -> Result<migration::DomainEndpoint, migration::MigrationError> {
    let source = migration::domain_endpoint(&args.connect, name, options.qmp_timeout).await?;
    let (disks, create) = match &options.disks {
        DiskSelection::Nodes(names) => {
            let devices = source.devices_of(names)?;
            let targets = source
                .disks
                .iter()
                .filter(|d| d.alias.as_ref().is_some_and(|a| devices.contains(a)))
                .map(|d| d.target.clone())
                .collect();
            (DiskSelection::Nodes(devices), Some(targets))
        }
        DiskSelection::AllLocal => (DiskSelection::AllLocal, None),
        DiskSelection::None => (DiskSelection::None, Some(Vec::new())),
    };
    let shared = source.devices_of(&options.shared_disks)?;
    let mut per_node = std::collections::BTreeMap::new();
    for (disk, copy) in &options.disk_copy.per_node {
        per_node.insert(source.device_of(disk)?, *copy);
    }
    options.disk_copy.per_node = per_node;
    if args.to.is_some() {
        // Each disk's own copy mode (`--disk vda,copy=top`), by target as the XML names it.
        let top_only = source
            .disks
            .iter()
            .filter(|d| {
                let copy = d
                    .alias
                    .as_ref()
                    .map_or(options.disk_copy.default, |a| options.disk_copy.for_node(a));
                copy == DiskCopy::Top
            })
            .map(|d| d.target.clone())
            .collect();
        let domain = migration::dest_domain(
            &args.connect,
            name,
            dest_xml,
            create,
            top_only,
            migration::DestDisks {
                adopt: args.adopt_dest_disks,
                grow: options.create_dest_disks,
            },
            options.qmp_timeout,
        )
        .await?;
        options.dest_domain = Some(domain);
    }
    options.source.qmp = source.socket.clone();
    options.source_domain_uuid = Some(source.uuid.clone());
    options.disks = disks;
    options.shared_disks = shared;
    Ok(source)
}

/// The job's id: `--job-id`, else the domain's name (CloudStack's vmName, so that
/// `jobs cancel i-2-3-VM` reaches it) when it is a valid id, else `None` (a random one).
fn job_id(args: &MigrateArgs) -> Option<String> {
    if let Some(id) = &args.job_id {
        return Some(id.clone());
    }
    let name = args.domain.as_ref()?;
    match qemu_tls_migrate::jobs::check_id(name) {
        Ok(()) => Some(name.clone()),
        Err(e) => {
            tracing::warn!("the domain's name is not a job id ({e}): a random one is used");
            None
        }
    }
}

/// Why the job could not start. Its id taken when it defaulted to the domain's name means
/// another run migrates that domain: said as the VM's lock says it (kind busy).
fn job_refusal(
    args: &MigrateArgs,
    e: qemu_tls_migrate::jobs::JobsError,
) -> migration::MigrationError {
    use qemu_tls_migrate::jobs::JobsError;
    use qemu_tls_migrate::vm_lock::VmLockError;
    if let (None, Some(domain), JobsError::IdInUse { id }) = (&args.job_id, &args.domain, &e) {
        return VmLockError::Busy {
            vm: format!("domain {domain}"),
            job: Some(id.clone()),
            pid: None,
        }
        .into();
    }
    let what = crate::output::error_chain(&e).join(": ");
    migration::MigrationError::BadOptions {
        what: format!("control socket: {what}"),
    }
}

/// `--destroy-source` after a completed migration: the source domain destroyed, or why not
/// (its own member of the result and exit 5, for the caller to end the paused copy itself).
async fn destroy_source(uri: &str, name: &str, timeout: Duration) -> SourceEnd {
    let error = match migration::destroy_domain(uri, name, timeout).await {
        Ok(()) => None,
        Err(e) => {
            let what = crate::output::error_chain(&e).join(": ");
            tracing::error!(
                "--destroy-source: the source domain {name} was not destroyed: {what}; the guest \
                 runs on the destination"
            );
            Some(what)
        }
    };
    SourceEnd {
        domain: name.to_string(),
        destroyed: error.is_none(),
        error,
    }
}

/// `--plan`: the forecast alone.
async fn plan(options: &ValidOptions, json: bool) -> anyhow::Result<Outcome> {
    match migration::plan(options).await {
        Ok(f) => {
            crate::output::print_forecast(&f, json);
            Ok(if f.converges {
                Outcome::Success
            } else {
                Outcome::Refused
            })
        }
        Err(e) => {
            let report = Report::refused(e, Duration::ZERO);
            print_report(&report, json);
            Ok(outcome_of(&report))
        }
    }
}

pub async fn run(args: MigrateArgs, quiet: bool) -> anyhow::Result<Outcome> {
    let mut options = args.options()?;
    // Lives until the migration is over: it may serve the source's QMP socket.
    let mut endpoint = None;
    if let Some(name) = &args.domain {
        let dest_xml = match &args.dest_xml {
            Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("--dest-xml {}: cannot read it: {e}", path.display())
            })?),
            None => None,
        };
        match resolve_domain(&args, name, dest_xml, &mut options).await {
            Ok(source) => endpoint = Some(source),
            Err(e) => {
                let report = Report::refused(e, Duration::ZERO);
                print_report(&report, args.tuning.json);
                return Ok(outcome_of(&report));
            }
        }
    }

    if args.plan {
        return match options.validate() {
            Ok(valid) => plan(&valid, args.tuning.json).await,
            Err(e) => {
                let report = Report::refused(e, Duration::ZERO);
                print_report(&report, args.tuning.json);
                Ok(outcome_of(&report))
            }
        };
    }
    let remote = args.to.as_ref().map(|to| RemoteTarget {
        address: to.clone(),
        server_name: args.dest_host.clone(),
        qmp: args
            .dest_qmp
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        pki_dir: options.source.pki_dir.clone(),
    });
    if let Some(path) = &args.result_file
        && let Err(what) = check_result_file(path)
    {
        // Before anything moves: a result that cannot be delivered must not follow a migration.
        let report = Report::refused(
            migration::MigrationError::BadOptions { what },
            Duration::ZERO,
        );
        print_report(&report, args.tuning.json);
        return Ok(outcome_of(&report));
    }
    let vm = match (&args.domain, &args.source_qmp) {
        (Some(domain), _) => format!("domain {domain}"),
        (None, qmp) => qmp
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    };
    let job_id = job_id(&args);
    let (job, control) = match RunningJob::start(job_id.as_deref(), vm) {
        Ok(started) => started,
        Err(e) => {
            // Before anything moves: a migration that cannot be cancelled by the caller must
            // not start.
            let report = Report::refused(job_refusal(&args, e), Duration::ZERO);
            print_report(&report, args.tuning.json);
            return Ok(outcome_of(&report));
        }
    };
    tracing::info!(job = job.id(), "migration job started");
    // Named to a second run on the same VM, which the VM's lock refuses.
    options.job_id = Some(job.id().to_string());
    let options = match options.validate() {
        Ok(valid) => valid,
        Err(e) => {
            let report = Report::refused(e, Duration::ZERO);
            print_report_job(&report, args.tuning.json, Some(job.id()));
            return Ok(outcome_of(&report));
        }
    };
    let mut report = run_migration_to(
        &options,
        remote.as_ref(),
        args.tuning.json,
        quiet,
        Some((&job, control)),
    )
    .await;
    let job_id = job.id().to_string();
    // The control socket goes before the result is printed: whoever reads the result and
    // lists jobs then no longer sees this one.
    drop(job);
    report.source_qmp_access = endpoint.as_ref().map(|e| e.access);
    drop(endpoint);
    if let (Some(name), true, FinalStatus::Completed) =
        (&args.domain, args.destroy_source, report.status)
    {
        // Completed means the destination confirmed it runs the guest (--dest-paused conflicts).
        report.source_end = Some(destroy_source(&args.connect, name, options.qmp_timeout).await);
    }
    print_report_job(&report, args.tuning.json, Some(&job_id));
    if let Some(path) = &args.result_file
        && let Err(e) = write_result_file(
            path,
            &crate::output::report_json_job(&report, Some(&job_id)),
        )
    {
        // The migration's own outcome stands; the exit code must not lie about it.
        tracing::error!("{e:#}");
    }
    Ok(outcome_of(&report))
}
