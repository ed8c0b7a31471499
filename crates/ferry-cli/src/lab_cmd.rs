//! `ferry lab ...`: the command line of the lab (see [`crate::lab`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use ferry_types::HostName;

use crate::lab::{down, start_agent, up, Lab, LabOptions};
use crate::lab_libvirt::{self, DomainSpec};

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Create a lab in DIR and start its agents.
    Up {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        hosts: u32,
        /// QEMU migration bandwidth cap for every host (MiB/s, 0 = none).
        #[arg(long, default_value_t = 0)]
        max_bandwidth_mib_s: u64,
        /// INSECURE: no swtpm and attestation disabled on every host.
        #[arg(long)]
        insecure_no_tpm: bool,
        /// Who runs the hosts' VMs: Ferry's agent ("qemu") or a libvirtd
        /// per host ("libvirt", each in its own mount namespace).
        #[arg(long, default_value = "qemu", value_parser = ["qemu", "libvirt"])]
        backend: String,
        /// Give each agent an operator API listener on 127.0.0.1 and a
        /// migration listener of its own on 127.0.1.N (loopback).
        #[arg(long)]
        two_planes: bool,
    },
    /// Stop the lab's agents and every VM they run.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// (Re)start one host's agent, e.g. after a crash or a config change.
    Start {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        host: HostName,
    },
    /// Define the test guest as a libvirt domain on a lab host run by
    /// libvirt (`lab up --backend libvirt`) and start it. Prints the
    /// console file the guest appends to.
    Domain {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        host: HostName,
        /// The domain's name.
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 128)]
        memory_mib: u32,
        /// The test guest's kernel command line, e.g. "fill_mib=64 dirty=16 hb_ms=10".
        #[arg(long, default_value = "")]
        cmdline: String,
    },
    /// Measure this machine's ceilings for the data path: AES-GCM and
    /// ChaCha20-Poly1305 (aws-lc-rs), BLAKE3 and memcpy per core, loopback
    /// TCP. Benchmarks print them first (rates in bytes per second with --json).
    Ceilings,
}

pub async fn run(cmd: LabCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        LabCommand::Up {
            dir,
            hosts,
            max_bandwidth_mib_s,
            insecure_no_tpm,
            two_planes,
            backend,
        } => {
            let opts = LabOptions {
                hosts,
                bandwidth_mib_s: max_bandwidth_mib_s,
                tpm: !insecure_no_tpm,
                libvirt: backend == "libvirt",
                two_planes,
            };
            let lab = up(&dir, opts).await?;
            if json {
                outln!("{}", serde_json::to_string(&lab)?);
            } else {
                outln!("lab in {}", lab.dir.display());
                outln!("  CA            {}", lab.ca.display());
                outln!("  operator      {} (role admin)", lab.operator_cert.display());
                outln!("  client config {}", lab.client_config.display());
                for h in &lab.hosts {
                    let migration = h.migration.map(|m| format!("  migration {m}"));
                    outln!(
                        "  {:<8} {}{}  metrics http://{}/metrics  config {}",
                        h.name.as_str(),
                        h.addr,
                        migration.unwrap_or_default(),
                        h.metrics,
                        h.config.display()
                    );
                }
                outln!(
                    "try: FERRY_CLIENT_CONFIG={} ferry vm list --host host1",
                    lab.client_config.display()
                );
            }
        }
        LabCommand::Down { dir } => {
            down(&dir).await?;
            if json {
                outln!("{}", serde_json::json!({"down": dir}));
            } else {
                outln!("lab in {} stopped", dir.display());
            }
        }
        LabCommand::Start { dir, host } => {
            let lab = Lab::load(&dir)?;
            let pid = start_agent(&lab, lab.host(&host)?).await?;
            if json {
                outln!("{}", serde_json::json!({"host": host, "pid": pid}));
            } else {
                outln!("agent {host} started (pid {pid})");
            }
        }
        LabCommand::Domain { dir, host, name, memory_mib, cmdline } => {
            let lab = Lab::load(&dir)?;
            let Some(lv) = &lab.host(&host)?.libvirt else {
                anyhow::bail!("{host} does not run libvirt (lab up --backend libvirt)");
            };
            let console = lab.dir.join(format!("{name}.console"));
            let kernel = lab.images_dir.join(&lab.guest_image);
            let spec = DomainSpec {
                name: &name,
                kernel: &kernel,
                console: &console,
                memory_mib,
                cmdline: &cmdline,
            };
            lab_libvirt::start_domain(lv, &lab.dir, &spec)?;
            if json {
                outln!("{}", serde_json::json!({"host": host, "domain": name, "console": console}));
            } else {
                outln!("domain {name} started on {host}; console {}", console.display());
            }
        }
        LabCommand::Ceilings => {
            let budget = ferry_ceilings::Budget::default();
            let c = tokio::task::spawn_blocking(move || ferry_ceilings::measure(budget)).await??;
            if json {
                outln!("{}", serde_json::to_string(&c)?);
            } else {
                outln!("{c}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
