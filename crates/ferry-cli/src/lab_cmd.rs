//! `ferry lab ...`: the command line of the lab (see [`crate::lab`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use ferry_types::HostName;

use crate::lab::{down, start_agent, up, Lab, LabOptions};
use crate::lab_libvirt::{self, DomainSpec};
use crate::lab_link::{self, LinkChange};

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
        /// Each host in a network namespace of its own, with a management
        /// and a migration interface on two lab-owned bridges (the default
        /// when running as root, except with --backend libvirt).
        #[arg(long)]
        netns: bool,
        /// All hosts on loopback, even when running as root.
        #[arg(long)]
        no_netns: bool,
    },
    /// Stop the lab's agents and every VM they run, and delete its
    /// network namespaces.
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
    /// Shape or break a host's migration link (a lab made with --netns):
    /// exactly one of the options; each prints what it set.
    #[command(group(clap::ArgGroup::new("change").required(true)))]
    Link {
        #[arg(long)]
        dir: PathBuf,
        host: HostName,
        /// Both directions at this rate (tbf), e.g. 1gbit, 200mbit.
        #[arg(long, group = "change")]
        rate: Option<String>,
        /// Drop this share of packets in and out at random, e.g. 2%.
        #[arg(long, group = "change")]
        loss: Option<String>,
        /// Take the link down.
        #[arg(long, group = "change")]
        down: bool,
        /// Bring the link back up.
        #[arg(long, group = "change")]
        up: bool,
        /// Drop everything to and from this host's migration address.
        #[arg(long, group = "change", value_name = "HOST2")]
        partition: Option<HostName>,
        /// Undo every shaping, drop and partition, and bring the link up.
        #[arg(long, group = "change")]
        clear: bool,
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
            netns,
            no_netns,
        } => {
            let libvirt = backend == "libvirt";
            let is_root = crate::lab_netns::is_root();
            let (netns, warning) = crate::lab_netns::choose(netns, no_netns, is_root, libvirt)?;
            if let Some(w) = warning {
                eprintln!("{w}");
            }
            let opts = LabOptions {
                hosts,
                bandwidth_mib_s: max_bandwidth_mib_s,
                tpm: !insecure_no_tpm,
                libvirt,
                two_planes,
                netns,
            };
            let lab = up(&dir, opts).await?;
            if json {
                outln!("{}", serde_json::to_string(&lab)?);
            } else {
                outln!("lab in {}", lab.dir.display());
                outln!("  CA            {}", lab.ca.display());
                outln!("  operator      {} (role admin)", lab.operator_cert.display());
                outln!("  client config {}", lab.client_config.display());
                if let Some(net) = &lab.net {
                    outln!(
                        "  networks      management {}, migration {} (namespaces {}-*)",
                        net.mgmt_subnet,
                        net.migration_subnet,
                        net.prefix
                    );
                }
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
        LabCommand::Link { dir, host, rate, loss, down, up, partition, clear } => {
            let lab = Lab::load(&dir)?;
            let Some(net) = &lab.net else {
                anyhow::bail!(
                    "the lab in {} is on loopback: `lab link` needs --netns",
                    dir.display()
                );
            };
            let change = match (rate, loss, partition) {
                (Some(r), _, _) => LinkChange::Rate(lab_link::parse_rate(&r)?),
                (_, Some(l), _) => LinkChange::Loss(lab_link::parse_loss(&l)?),
                (_, _, Some(peer)) if peer == host => {
                    anyhow::bail!("{host} cannot be partitioned from itself")
                }
                (_, _, Some(peer)) => {
                    LinkChange::Partition { addr: net.host(&peer)?.migration, peer }
                }
                _ if down => LinkChange::Down,
                _ if up => LinkChange::Up,
                _ => {
                    debug_assert!(clear, "clap requires one change");
                    LinkChange::Clear
                }
            };
            let said = lab_link::apply(net, &host, &change)?;
            if json {
                outln!("{}", serde_json::json!({"host": host, "set": said}));
            } else {
                outln!("{said}");
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
