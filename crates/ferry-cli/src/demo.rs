//! `ferry demo`: a lab of two hosts, the test guest started on the first,
//! migrated live to the second, and everything checked: where it runs, that
//! it kept running, that its memory is intact, and the blackout it saw.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use ferry_agent::protocol::{ApiRequest, ApiResponse, VmInfo};
use ferry_agent::{MigrationRecord, MigrationState};
use ferry_guest::GuestParams;
use ferry_types::{HostName, VmName};
use serde::Serialize;

use crate::console;
use crate::lab::{self, Lab};
use crate::lab_netns;
use crate::opclient::OpClient;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Lab directory (default: a new directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the lab running afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// MiB of guest memory filled with checked, incompressible data.
    #[arg(long, default_value_t = 256)]
    pub fill: u32,
    /// Pages the guest dirties per millisecond while it migrates.
    #[arg(long, default_value_t = 64)]
    pub dirty: u32,
    /// Who runs the VM: Ferry's agent ("qemu") or a libvirtd per host
    /// ("libvirt": the guest is a libvirt domain and libvirt runs its
    /// migration, carried by the agents).
    #[arg(long, default_value = "qemu", value_parser = ["qemu", "libvirt"])]
    pub backend: String,
    /// Each host in a network namespace of its own, the migration on a
    /// network of its own (the default when running as root, except with
    /// --backend libvirt).
    #[arg(long)]
    pub netns: bool,
    /// Both hosts on loopback, even when running as root.
    #[arg(long)]
    pub no_netns: bool,
}

#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub migrated: bool,
    pub vm: VmName,
    pub source: HostName,
    pub destination: HostName,
    pub running_on: Vec<HostName>,
    pub migration_id: String,
    pub bytes: u64,
    pub total_ms: u64,
    pub downtime_ms: Option<u64>,
    pub guest_blackout_ms: Option<u64>,
    /// Connect, TLS handshake and mutual attestation, before any VM byte.
    pub setup_ms: Option<u64>,
    pub network: Network,
    pub checks: Checks,
    pub lab_dir: PathBuf,
}

/// The network the migration crossed.
#[derive(Debug, Serialize)]
pub struct Network {
    /// "netns" (each host in a namespace of its own, with a management and
    /// a migration interface) or "loopback".
    pub kind: &'static str,
    /// The migration network's subnet (namespaces only).
    pub subnet: Option<String>,
    /// The address the source's connections leave from.
    pub source_addr: IpAddr,
    /// The destination's migration listener.
    pub destination_addr: SocketAddr,
    /// Bytes the source sent on its migration and its management interface
    /// while the VM moved (namespaces only: loopback has one interface).
    pub source_sent_migration_bytes: Option<u64>,
    pub source_sent_management_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Checks {
    /// Both agents authenticated each other with certificates from the lab CA (TLS 1.3).
    pub mutual_tls: bool,
    /// Each side verified the other's TPM quote (enrolled AK, channel binding, PCRs).
    pub mutual_attestation: bool,
    /// Source and destination records carry the same byte count and BLAKE3 digest.
    pub digest_verified: bool,
    /// The VM runs on the destination and nowhere else; the source QEMU is gone.
    pub single_copy: bool,
    /// The guest's heartbeat counter went on across the switch.
    pub heartbeat_continued: bool,
    /// The guest's own memory sweeps found no error after the migration.
    pub memory_consistent: bool,
    /// Both agents' signed audit logs verify with only the CA certificate and
    /// agree on the signed offer, accept, commit and receipt.
    pub evidence_verified: bool,
}

async fn vms_on(c: &OpClient, host: &HostName) -> Result<Vec<VmInfo>> {
    match c.call(host, &ApiRequest::VmList).await? {
        ApiResponse::Vms { vms } => Ok(vms),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

async fn record_on(
    c: &OpClient,
    host: &HostName,
    id: ferry_types::MigrationId,
) -> Result<MigrationRecord> {
    match c.call(host, &ApiRequest::MigrationShow { id }).await? {
        ApiResponse::Migration(m) => Ok(m),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

pub async fn run(args: DemoArgs, json: bool) -> Result<ExitCode> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id())),
    };
    let say = |s: &str| {
        if !json {
            eprintln!("==> {s}");
        }
    };
    let libvirt = args.backend == "libvirt";
    // The same choice as `lab up`: namespaces as root, else loopback.
    let (netns, warning) =
        lab_netns::choose(args.netns, args.no_netns, lab_netns::is_root(), libvirt)?;
    if let Some(w) = warning {
        eprintln!("{w}");
    }
    say(&format!(
        "creating a lab of two hosts in {}, {}",
        dir.display(),
        if netns {
            "each in a network namespace of its own with a management and a migration network"
        } else {
            "both on loopback"
        }
    ));
    let opts = lab::LabOptions {
        hosts: 2,
        bandwidth_mib_s: 0,
        tpm: true,
        two_planes: false,
        libvirt,
        netns,
    };
    let lab = lab::up(&dir, opts).await?;
    let result = demo(&lab, &args, json).await;
    if !args.keep {
        let _ = lab::down(&lab.dir).await;
        if args.dir.is_none() {
            let _ = std::fs::remove_dir_all(&lab.dir);
        }
    }
    let report = result?;
    let ok = report.migrated && report.running_on == [report.destination.clone()];
    if json {
        outln!("{}", serde_json::to_string(&report)?);
    } else {
        outln!();
        outln!(
            "VM {} moved {} -> {} in {} ms ({:.1} MiB)",
            report.vm,
            report.source,
            report.destination,
            report.total_ms,
            report.bytes as f64 / 1048576.0
        );
        outln!(
            "  setup (TLS + mutual attestation) {} ms, before any VM byte moved",
            fmt(report.setup_ms)
        );
        outln!(
            "  QEMU downtime {} ms; blackout seen by the guest {} ms",
            fmt(report.downtime_ms),
            fmt(report.guest_blackout_ms)
        );
        let n = &report.network;
        match &n.subnet {
            Some(subnet) => outln!(
                "  over the migration network {subnet}: {} {} -> {} {}",
                report.source,
                n.source_addr,
                report.destination,
                n.destination_addr
            ),
            None => outln!(
                "  over loopback: {} {} -> {} {}",
                report.source,
                n.source_addr,
                report.destination,
                n.destination_addr
            ),
        }
        if let (Some(mig), Some(mgmt)) =
            (n.source_sent_migration_bytes, n.source_sent_management_bytes)
        {
            outln!(
                "  {} sent {:.1} MiB on its migration interface, {:.1} KiB on its management one",
                report.source,
                mig as f64 / 1048576.0,
                mgmt as f64 / 1024.0
            );
        }
        outln!("  runs on: {:?}", report.running_on.iter().map(|h| h.as_str()).collect::<Vec<_>>());
        let c = &report.checks;
        for (name, v) in [
            ("mutual TLS 1.3, certified host names", c.mutual_tls),
            ("mutual TPM attestation, bound to the channel", c.mutual_attestation),
            ("stream digest verified before resume", c.digest_verified),
            ("exactly one copy runs", c.single_copy),
            ("guest heartbeat continued", c.heartbeat_continued),
            ("guest memory consistent", c.memory_consistent),
            ("signed evidence verified offline (both audit logs agree)", c.evidence_verified),
        ] {
            outln!("  [{}] {name}", if v { "ok" } else { "FAILED" });
        }
        if args.keep {
            outln!("lab left running in {} (ferry lab down --dir ...)", lab.dir.display());
        }
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn fmt(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
}

async fn demo(lab: &Lab, args: &DemoArgs, json: bool) -> Result<DemoReport> {
    let say = |s: &str| {
        if !json {
            eprintln!("==> {s}");
        }
    };
    let client = OpClient::load(&lab.client_config)?;
    let (src, dst) = (lab.hosts[0].name.clone(), lab.hosts[1].name.clone());
    let vm: VmName = "demo".parse()?;
    // The lab's libvirt domains run under TCG (type='qemu') on any host.
    let on_tcg = lab.host(&src)?.libvirt.is_some()
        || match client.call(&src, &ApiRequest::Status).await? {
            ApiResponse::Status(s) => s.accel == "tcg",
            _ => true,
        };
    let params = GuestParams {
        fill_mib: args.fill,
        dirty_pages_per_ms: args.dirty,
        heartbeat_ms: 10,
        marker: None,
        // Keep QEMU's TCG dirty-tracking defect out of the checks (docs/known-issues.md).
        tlb_flush: on_tcg,
        ..GuestParams::default()
    };
    params.validate().map_err(|e| anyhow!("guest parameters: {e}"))?;
    say(&format!(
        "starting the test guest on {src} ({} MiB, {} MiB filled, dirtying {} pages/ms{})",
        args.memory,
        args.fill,
        args.dirty,
        if lab.host(&src)?.libvirt.is_some() { ", a libvirt domain" } else { "" }
    ));
    let info = start_guest(lab, &client, &src, &vm, args.memory, &params.cmdline()).await?;
    let src_log = PathBuf::from(&info.console_log);
    console::wait_for(
        &src_log,
        Duration::from_secs(120),
        "the guest to fill its memory and sweep it once",
        |l| console::is_ready(l) && console::clean_sweeps(l) >= 1,
    )
    .await?;
    let (src_host, dst_host) = (lab.host(&src)?, lab.host(&dst)?);
    say(&format!(
        "migrating {vm} {src} -> {dst} ({} -> {})",
        src_host.peer_addr().ip(),
        dst_host.peer_addr()
    ));
    let sent = || source_sent(lab, &src);
    let sent_before = sent()?;
    let mut view = crate::progress::ProgressView::new();
    let resp = client
        .request(
            &src,
            &ApiRequest::Migrate {
                vm: vm.clone(),
                to: dst.clone(),
                wait: true,
                streams: None,
                postcopy: false,
            },
            |p| {
                if !json {
                    view.update(p);
                }
            },
        )
        .await?;
    view.finish();
    let sent_after = sent()?;
    let rec = match resp {
        ApiResponse::Migration(m) => m,
        ApiResponse::Error { message, .. } => return Err(anyhow!("migration failed: {message}")),
        other => return Err(anyhow!("unexpected answer {other:?}")),
    };
    // Under libvirt both QEMUs append to one console file: what it held
    // when the migration returned is the source's part.
    let shared_console = console::read_console(&src_log)?.len();
    let dst_vms = vms_on(&client, &dst).await?;
    let dst_info = dst_vms.iter().find(|v| v.name == vm).cloned();
    let dst_log = match lab.host(&dst)?.libvirt {
        Some(_) => Some(src_log.clone()),
        None => dst_info.as_ref().map(|v| PathBuf::from(&v.console_log)),
    };
    if let Some(log) = &dst_log {
        say("waiting for two full memory sweeps on the destination");
        let _ = console::wait_for(
            log,
            Duration::from_secs(60),
            "two memory sweeps on the destination",
            |l| {
                let skip = if log == &src_log { shared_console } else { 0 };
                l.iter()
                    .skip(skip)
                    .filter(|x| matches!(x.line, ferry_guest::GuestLine::Sweep { .. }))
                    .count()
                    >= 2
            },
        )
        .await;
    }
    let (src_lines, dst_lines) = if dst_log.as_ref() == Some(&src_log) {
        let mut all = console::read_console(&src_log)?;
        let after = all.split_off(shared_console.min(all.len()));
        (all, after)
    } else {
        let departed = lab.host(&src)?.state_dir.join("departed").join(rec.id.to_string());
        let dst_lines = match &dst_log {
            Some(l) => console::read_console(l)?,
            None => Vec::new(),
        };
        (console::read_console(&departed.join("console.log"))?, dst_lines)
    };
    let mut cont = console::analyze(&src_lines, &dst_lines);
    if dst_log.as_ref() == Some(&src_log) {
        // libvirt's console file has no timestamps: no blackout to report.
        cont.guest_blackout_ms = None;
    }
    let mut running_on = Vec::new();
    for h in [&src, &dst] {
        if vms_on(&client, h).await?.iter().any(|v| v.name == vm && v.state == "running") {
            running_on.push(h.clone());
        }
    }
    let src_qemu_gone = !lab::pid_alive(info.pid as i32);
    let dst_rec = record_on(&client, &dst, rec.id).await?;
    let migrated =
        rec.state() == MigrationState::Completed && dst_rec.state() == MigrationState::Completed;
    Ok(DemoReport {
        migrated,
        vm,
        source: src.clone(),
        destination: dst.clone(),
        migration_id: rec.id.to_string(),
        bytes: rec.bytes,
        total_ms: rec.total_ms.unwrap_or(0),
        downtime_ms: rec.qemu_downtime_ms,
        guest_blackout_ms: cont.guest_blackout_ms,
        setup_ms: rec.setup_ms,
        network: Network {
            kind: if lab.net.is_some() { "netns" } else { "loopback" },
            subnet: lab.net.as_ref().map(|n| n.migration_subnet.clone()),
            source_addr: src_host.peer_addr().ip(),
            destination_addr: dst_host.peer_addr(),
            source_sent_migration_bytes: sent_before.zip(sent_after).map(|(b, a)| a.0 - b.0),
            source_sent_management_bytes: sent_before.zip(sent_after).map(|(b, a)| a.1 - b.1),
        },
        checks: Checks {
            mutual_tls: migrated,
            mutual_attestation: migrated
                && rec.attestation.as_ref().is_some_and(|a| a.peer_verified && a.quoted)
                && dst_rec.attestation.as_ref().is_some_and(|a| a.peer_verified && a.quoted),
            digest_verified: migrated
                && rec.digest.is_some()
                && rec.digest == dst_rec.digest
                && rec.bytes == dst_rec.bytes,
            single_copy: running_on == [dst.clone()] && src_qemu_gone,
            heartbeat_continued: cont.heartbeat_continued,
            memory_consistent: cont.memory_consistent(),
            evidence_verified: evidence_verified(lab, &src, &dst, &rec.id.to_string()),
        },
        running_on,
        lab_dir: lab.dir.clone(),
    })
}

/// Bytes the host has sent on its (migration, management) interfaces, when
/// it has a namespace of its own.
fn source_sent(lab: &Lab, host: &HostName) -> Result<Option<(u64, u64)>> {
    let Some(ns) = &lab.host(host)?.netns else { return Ok(None) };
    let (_, mig) = lab_netns::if_bytes(ns, lab_netns::MIGRATION_IF)?;
    let (_, mgmt) = lab_netns::if_bytes(ns, lab_netns::MGMT_IF)?;
    Ok(Some((mig, mgmt)))
}

/// Start the test guest on `host`: through the agent, or as a libvirt
/// domain when the host runs libvirt (the agent then lists it).
async fn start_guest(
    lab: &Lab,
    client: &OpClient,
    host: &HostName,
    vm: &VmName,
    memory_mib: u32,
    cmdline: &str,
) -> Result<VmInfo> {
    if let Some(lv) = &lab.host(host)?.libvirt {
        let console = lab.dir.join(format!("{vm}.console"));
        let kernel = lab.images_dir.join(&lab.guest_image);
        let domain = crate::lab_libvirt::DomainSpec {
            name: vm.as_str(),
            kernel: &kernel,
            console: &console,
            memory_mib,
            cmdline,
        };
        crate::lab_libvirt::start_domain(lv, &lab.dir, &domain)?;
        let listed = vms_on(client, host).await?.into_iter().find(|v| &v.name == vm);
        let mut info = listed.ok_or_else(|| anyhow!("{host} does not list domain {vm}"))?;
        info.console_log = console.display().to_string();
        return Ok(info);
    }
    let spec = serde_json::from_value(serde_json::json!({
        "name": vm, "memory_mib": memory_mib, "vcpus": 1, "machine": "q35",
        "boot": {"type": "kernel", "kernel": lab.guest_image, "cmdline": cmdline},
    }))
    .context("demo VM spec")?;
    match client.call(host, &ApiRequest::VmStart { spec, labels: None }).await? {
        ApiResponse::Vm(v) => Ok(v),
        other => Err(anyhow!("unexpected answer {other:?}")),
    }
}

/// Verify both hosts' audit logs offline and that they agree on this migration.
fn evidence_verified(lab: &Lab, src: &HostName, dst: &HostName, id: &str) -> bool {
    let log = |h: &HostName| lab.host(h).map(|h| h.state_dir.join("audit.log"));
    let (Ok(a), Ok(b)) = (log(src), log(dst)) else { return false };
    let Ok(ca) = ferry_audit::CaTrust::load(&lab.ca) else { return false };
    match ferry_audit::cross_check(&a, &b, &ca) {
        Ok(c) => c.migrations.iter().any(|m| m.migration_id == id && m.outcome == "completed"),
        Err(_) => false,
    }
}
