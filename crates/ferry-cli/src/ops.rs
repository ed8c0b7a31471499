//! Operator commands: status, vm, migrate, migrations. Each turns its
//! arguments into one typed API request.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::preflight::Verdict;
use ferry_agent::protocol::{ApiRequest, ApiResponse, ErrorKind};
use ferry_agent::MigrationRecord;
use ferry_types::{HostName, MigrationId, VmName};
use ferry_vmm::VmSpec;

use crate::opclient::OpClient;

/// Exit status of a migration whose outcome is not known yet.
pub const EXIT_IN_DOUBT: u8 = 4;

#[derive(Debug, Args, Clone)]
pub struct Target {
    /// Operator client config (credentials and agent addresses).
    #[arg(long, env = "FERRY_CLIENT_CONFIG")]
    pub client_config: PathBuf,
    /// The agent to ask; defaults to the client config's default_host.
    #[arg(long)]
    pub host: Option<HostName>,
}

impl Target {
    pub fn open(&self) -> Result<(OpClient, HostName)> {
        let c = OpClient::load(&self.client_config)?;
        let h = c.host(self.host.as_ref())?;
        Ok((c, h))
    }
}

// Parsed once per invocation: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start a VM from a spec: a JSON file (--spec) or flags.
    Start(VmStartArgs),
    /// List the VMs on a host.
    List(Target),
    /// Stop (kill) a VM.
    Stop {
        vm: VmName,
        #[command(flatten)]
        target: Target,
    },
    /// Run a read-only QMP command on a VM's QEMU, for diagnostics.
    ///
    /// The agent holds each VM's only QMP socket and passes through the
    /// commands that read: query-* (query-status, query-block, query-pci,
    /// query-migrate, ...), qom-list and qom-list-types. Anything else is
    /// refused. Works while a migration holds the VM. Prints QEMU's `return`
    /// value as JSON.
    Qmp {
        vm: VmName,
        /// The QMP command, e.g. query-status.
        command: String,
        /// Its arguments: a JSON object, e.g. '{"path": "/machine"}'.
        #[arg(long = "args")]
        arguments: Option<String>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Debug, Args)]
pub struct VmStartArgs {
    #[command(flatten)]
    pub target: Target,
    /// A JSON VM spec; the flags below are ignored when given.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    #[arg(long)]
    pub name: Option<VmName>,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// q35 or pc.
    #[arg(long, default_value = "q35")]
    pub machine: String,
    /// Kernel image name, from the host's images directory.
    #[arg(long, conflicts_with = "disk")]
    pub kernel: Option<String>,
    #[arg(long)]
    pub initrd: Option<String>,
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Disk image name, from the host's images directory.
    #[arg(long)]
    pub disk: Option<String>,
    /// The controller the disk hangs on: virtio (fastest), ide (machine pc
    /// only) or sata, for images whose boot loader has no virtio driver.
    #[arg(long, requires = "disk", conflicts_with = "kernel", default_value = "virtio",
          value_parser = ["virtio", "ide", "sata"])]
    pub disk_bus: String,
    /// Tenant the VM belongs to (policy label).
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Security level 0..=3 (policy label): hosts need at least this trust level.
    #[arg(long, default_value_t = 0)]
    pub security_level: u8,
    /// Zones the VM may run in (repeatable; none = anywhere).
    #[arg(long = "zone")]
    pub zones: Vec<String>,
    /// Tenants this VM must not share a host with (repeatable).
    #[arg(long = "anti-affinity")]
    pub anti_affinity: Vec<String>,
    /// Give the VM its own virtual TPM 2.0 (swtpm): crb (the default with
    /// a bare --tpm) or tis (docs/vtpm.md).
    #[arg(long, num_args = 0..=1, default_missing_value = "crb", value_parser = ["crb", "tis"])]
    pub tpm: Option<String>,
}

impl VmStartArgs {
    fn spec(&self) -> Result<VmSpec> {
        if let Some(path) = &self.spec {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            return serde_json::from_str(&text)
                .with_context(|| format!("VM spec {} is invalid", path.display()));
        }
        let name = self.name.as_ref().ok_or_else(|| anyhow!("give --spec or --name"))?;
        let boot = match (&self.kernel, &self.disk) {
            (Some(k), _) => {
                serde_json::json!({"type": "kernel", "kernel": k, "initrd": self.initrd, "cmdline": self.cmdline})
            }
            (None, Some(d)) => {
                serde_json::json!({"type": "disk", "image": d, "bus": self.disk_bus})
            }
            (None, None) => bail!("give --kernel or --disk"),
        };
        let tpm = self.tpm.as_deref().unwrap_or("none");
        let v = serde_json::json!({"name": name, "memory_mib": self.memory, "vcpus": self.vcpus, "machine": self.machine, "boot": boot, "tpm": tpm});
        serde_json::from_value(v).context("invalid VM spec")
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// The VM to move.
    pub vm: VmName,
    /// The destination host (its certificate must name it).
    #[arg(long)]
    pub to: HostName,
    /// Return once the migration has started instead of waiting for its end.
    #[arg(long)]
    pub no_wait: bool,
    /// Data streams: 1, or 1 + QEMU multifd channels on parallel TLS
    /// connections (default: the agent's [migration] streams).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub streams: Option<u8>,
    /// Allow post-copy: after QEMU's first pass over memory the VM stops
    /// here and runs on the destination, which fetches the pages it still
    /// lacks. A guest that dirties memory faster than it can be sent then
    /// still moves. Risk: until the last page arrives the VM needs both
    /// hosts and the link; if the link breaks it stalls, and if this host
    /// is lost, so is the VM. Both hosts' policies must allow it (Cedar
    /// context.postcopy). Not with --streams > 1.
    #[arg(long)]
    pub postcopy: bool,
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Subcommand)]
pub enum MigrationsCommand {
    /// All migrations this host took part in, oldest first.
    List(Target),
    /// One migration's record.
    Show {
        id: MigrationId,
        #[command(flatten)]
        target: Target,
    },
    /// Stop an outgoing migration before it commits; the VM resumes on the source.
    Cancel {
        id: MigrationId,
        #[command(flatten)]
        target: Target,
    },
    /// Settle an in-doubt migration by asking its destination what happened.
    Resolve {
        id: MigrationId,
        #[command(flatten)]
        target: Target,
    },
    /// Resume a post-copy migration whose link broke after the destination
    /// took the VM over (state postcopy_active; ask its source host). Both
    /// QEMUs must still run. Safe to repeat until it succeeds. The source
    /// agent also tries this on its own ([migration]
    /// postcopy_recover_retry_ms); this runs an attempt now.
    Recover {
        id: MigrationId,
        #[command(flatten)]
        target: Target,
    },
}

fn print_json(v: &impl serde::Serialize) {
    outln!("{}", serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")));
}

/// Turn an `Error` answer into an exit status (printing it once).
fn finish(resp: ApiResponse, json: bool, text: impl FnOnce(&ApiResponse)) -> Result<ExitCode> {
    if let ApiResponse::Error { kind, message } = &resp {
        if json {
            print_json(&resp);
        } else {
            eprintln!("error: {message}");
        }
        return Ok(ExitCode::from(if *kind == ErrorKind::InDoubt { EXIT_IN_DOUBT } else { 1 }));
    }
    if json {
        print_json(&resp);
    } else {
        text(&resp);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn status(t: Target, json: bool) -> Result<ExitCode> {
    let (c, host) = t.open()?;
    let resp = c.request(&host, &ApiRequest::Status, |_| {}).await?;
    finish(resp, json, |r| {
        if let ApiResponse::Status(s) = r {
            outln!(
                "host {}  version {}  protocol {}  accel {}",
                s.host,
                s.version,
                s.protocol,
                s.accel
            );
            outln!("vms {}  active migrations {}  peers {:?}", s.vms, s.active_migrations, s.peers);
            outln!("api {}  migration {}", s.api_listen, s.migration_listen);
            if let Some(v) = &s.vtpm {
                outln!("vtpm {}", v.summary());
            }
            for c in &s.checks {
                let verdict = match c.verdict {
                    Verdict::Ok => "ok",
                    Verdict::Warn => "WARN",
                    Verdict::Fail => "FAIL",
                };
                outln!("  {verdict:<4} {:<17} {}", c.name, c.detail);
                if let Some(fix) = &c.fix {
                    outln!("       {:<17} fix: {fix}", "");
                }
            }
        }
    })
}

pub async fn vm(cmd: VmCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        VmCommand::Start(args) => {
            let spec = args.spec()?;
            let labels = ferry_policy::VmLabels {
                tenant: args.tenant.clone(),
                security_level: args.security_level,
                allowed_zones: args.zones.clone(),
                anti_affinity: args.anti_affinity.clone(),
            };
            let (c, host) = args.target.open()?;
            let resp = c
                .request(&host, &ApiRequest::VmStart { spec, labels: Some(labels) }, |_| {})
                .await?;
            finish(resp, json, |r| {
                if let ApiResponse::Vm(v) = r {
                    let tpm =
                        if v.tpm.is_none() { String::new() } else { format!(", vTPM {}", v.tpm) };
                    outln!("started {} on {host} (pid {}, {}{tpm})", v.name, v.pid, v.accel);
                }
            })
        }
        VmCommand::List(t) => {
            let (c, host) = t.open()?;
            let resp = c.request(&host, &ApiRequest::VmList, |_| {}).await?;
            finish(resp, json, |r| {
                if let ApiResponse::Vms { vms } = r {
                    outln!(
                        "{:<20} {:<12} {:>8} {:>6} {:>5} {:<5} MIGRATION",
                        "NAME",
                        "STATE",
                        "PID",
                        "MiB",
                        "CPUS",
                        "TPM"
                    );
                    for v in vms {
                        let m = v.migration.map(|m| m.to_string()).unwrap_or_default();
                        outln!(
                            "{:<20} {:<12} {:>8} {:>6} {:>5} {:<5} {m}",
                            v.name.as_str(),
                            v.state,
                            v.pid,
                            v.memory_mib,
                            v.vcpus,
                            v.tpm.name()
                        );
                    }
                }
            })
        }
        VmCommand::Qmp { vm, command, arguments, target } => {
            let arguments = match arguments {
                Some(text) => Some(
                    serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&text)
                        .with_context(|| format!("--args {text:?} is not a JSON object"))?,
                ),
                None => None,
            };
            let (c, host) = target.open()?;
            let resp =
                c.request(&host, &ApiRequest::VmQmp { vm, command, arguments }, |_| {}).await?;
            finish(resp, json, |r| {
                if let ApiResponse::Qmp { result, .. } = r {
                    let pretty = serde_json::to_string_pretty(result);
                    outln!("{}", pretty.unwrap_or_else(|e| format!("(unprintable: {e})")));
                }
            })
        }
        VmCommand::Stop { vm, target } => {
            let (c, host) = target.open()?;
            let resp = c.request(&host, &ApiRequest::VmStop { vm }, |_| {}).await?;
            finish(resp, json, |r| {
                if let ApiResponse::Stopped { vm } = r {
                    outln!("stopped {vm} on {host}");
                }
            })
        }
    }
}

pub async fn migrate(args: MigrateArgs, json: bool) -> Result<ExitCode> {
    let (c, host) = args.target.open()?;
    let req = ApiRequest::Migrate {
        vm: args.vm.clone(),
        to: args.to.clone(),
        wait: !args.no_wait,
        streams: args.streams,
        postcopy: args.postcopy,
    };
    let show = !json && !args.no_wait;
    let mut view = crate::progress::ProgressView::new();
    let resp = c
        .request(&host, &req, |p| {
            if show {
                view.update(p)
            }
        })
        .await?;
    view.finish();
    finish(resp, json, |r| {
        if let ApiResponse::Migration(m) = r {
            print_record(m);
        }
    })
}

pub fn print_record(m: &MigrationRecord) {
    outln!("migration {}: {} {} -> {}: {:?}", m.id, m.vm, m.source, m.destination, m.state());
    outln!(
        "  bytes {}  total {} ms  QEMU downtime {} ms  setup {} ms",
        m.bytes,
        opt(m.total_ms),
        opt(m.qemu_downtime_ms),
        opt(m.setup_ms)
    );
    if let Some(ms) = m.qemu_total_ms {
        outln!("  QEMU's own migration time {ms} ms");
    }
    if let Some(ms) = m.gate_hold_ms {
        outln!("  resume gate held the loaded VM {ms} ms (Commit awaited, checked, audited)");
    }
    match &m.attestation {
        Some(a) if a.peer_verified => {
            outln!("  attestation: {} verified (PCRs {:?}), {} ms", m.peer(), a.peer_pcrs, a.ms)
        }
        Some(_) => outln!("  attestation: NOT verified"),
        None => {}
    }
    for i in &m.insecure {
        outln!("  INSECURE: {i}");
    }
    if !m.tpm.is_none() {
        outln!("  vTPM: {} (its state moved inside the stream)", m.tpm);
    }
    if m.receipt.is_some() {
        outln!("  signed receipt: yes");
    }
    if let Some(d) = m.digest {
        outln!("  digest {d}");
    }
    if let Some(e) = &m.error {
        outln!("  {e}");
    }
}

fn opt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

pub async fn migrations(cmd: MigrationsCommand, json: bool) -> Result<ExitCode> {
    let (req, target) = match cmd {
        MigrationsCommand::List(t) => (ApiRequest::MigrationList, t),
        MigrationsCommand::Show { id, target } => (ApiRequest::MigrationShow { id }, target),
        MigrationsCommand::Resolve { id, target } => (ApiRequest::MigrationResolve { id }, target),
        MigrationsCommand::Cancel { id, target } => (ApiRequest::MigrationCancel { id }, target),
        MigrationsCommand::Recover { id, target } => (ApiRequest::MigrationRecover { id }, target),
    };
    let (c, host) = target.open()?;
    let resp = c.request(&host, &req, |_| {}).await?;
    finish(resp, json, |r| match r {
        ApiResponse::Migration(m) => print_record(m),
        ApiResponse::Migrations { migrations } => {
            for m in migrations {
                outln!(
                    "{}  {:<11?} {:<11?} {} {} -> {}",
                    m.id,
                    m.role,
                    m.state(),
                    m.vm,
                    m.source,
                    m.destination
                );
                // Why it did not complete (aborted, denied, in doubt).
                if let Some(e) = &m.error {
                    outln!("    {e}");
                }
            }
        }
        _ => {}
    })
}
