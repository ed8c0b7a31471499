//! `ferry lab`: a CA, N agents and an operator identity, in one directory.
//! For trying Ferry, for the demo and for whole-system tests. Each host runs
//! in a network namespace of its own (`--netns`, see [`crate::lab_netns`])
//! or, as a fallback, all of them on loopback.
//!
//! ```text
//! DIR/ca/                     the cluster CA (ca.pem, ca.key, crl.pem)
//! DIR/images/ferry-guest.elf  the test guest, shared by all hosts
//! DIR/operator/               admin.pem, admin.key, client.toml
//! DIR/hosts/NAME/             NAME.pem, NAME.key, agent.toml, agent.log, agent.pid, state/,
//!                             tpm/ (swtpm state), ak.json (enrolled attestation key)
//! DIR/tpm-ca/                 a local "TPM manufacturer" CA that signed the swtpm EK certificates
//! DIR/aks/                    the registry of enrolled AKs
//! DIR/reference-values.toml   reference PCR values (all hosts: class "lab")
//! DIR/policy/                 ferry.cedar (the example policy set) and entities.json
//!                             (hosts in zone "lab" with trust 3, operator admin)
//! DIR/lab.json                what `lab up` printed
//! DIR/netns.json              the namespaces and addresses (`--netns`)
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_identity::{CaDir, Validity};
use ferry_types::{HostName, OperatorName, TrustDomain};
use serde::{Deserialize, Serialize};

use crate::lab_libvirt::{self, LabLibvirt};
use crate::lab_netns::{self, LabNet};
use crate::opclient::ClientConfig;
pub use crate::procs::pid_alive;
use crate::procs::{signal, StartedTpms};

pub const GUEST_IMAGE: &str = "ferry-guest.elf";

/// A host's software TPM in the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabTpm {
    pub dir: PathBuf,
    pub port: u16,
    pub tcti: String,
    pub ak: PathBuf,
}

#[derive(Debug, Clone, Copy)]
pub struct LabOptions {
    pub hosts: u32,
    pub bandwidth_mib_s: u64,
    pub tpm: bool,
    pub libvirt: bool,
    /// Separate API and migration listeners (on loopback).
    pub two_planes: bool,
    /// Each host in a network namespace of its own (implies two planes).
    pub netns: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabHost {
    pub name: HostName,
    /// The operator API (and, without a migration listener of its own,
    /// the peers' address too).
    pub addr: SocketAddr,
    /// The migration listener, when it has its own (`--two-planes`).
    #[serde(default)]
    pub migration: Option<SocketAddr>,
    /// Prometheus metrics (plain HTTP, loopback).
    pub metrics: SocketAddr,
    pub config: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    pub tpm: Option<LabTpm>,
    /// The host's own libvirtd (`--backend libvirt`); its agent runs in
    /// the libvirtd's mount namespace.
    #[serde(default)]
    pub libvirt: Option<LabLibvirt>,
    /// The host's network namespace (`--netns`).
    #[serde(default)]
    pub netns: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lab {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub ca_dir: PathBuf,
    pub crl: PathBuf,
    pub images_dir: PathBuf,
    pub guest_image: String,
    pub operator_cert: PathBuf,
    pub operator_key: PathBuf,
    pub client_config: PathBuf,
    pub hosts: Vec<LabHost>,
    /// Attestation material shared by the lab's hosts (None without TPMs).
    pub ak_registry: Option<PathBuf>,
    pub reference_values: Option<PathBuf>,
    pub tpm_manufacturer_ca: Option<PathBuf>,
    /// The hosts' namespaces and networks (`--netns`).
    #[serde(default)]
    pub net: Option<LabNet>,
}

impl LabHost {
    /// Where peers reach this host.
    pub fn peer_addr(&self) -> SocketAddr {
        self.migration.unwrap_or(self.addr)
    }
}

impl Lab {
    pub fn load(dir: &Path) -> Result<Lab> {
        let path = dir.join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no lab in {} (missing lab.json)", dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is corrupt", path.display()))
    }

    pub fn host(&self, name: &HostName) -> Result<&LabHost> {
        self.hosts
            .iter()
            .find(|h| &h.name == name)
            .ok_or_else(|| anyhow!("no host {name} in the lab"))
    }
}

/// Ports the lab listens on are picked below the kernel's ephemeral range:
/// a port the kernel hands out as "free" (bind to port 0) is also handed to
/// outgoing connections, so it can be taken before the agent binds it.
fn free_port() -> Result<u16> {
    free_ports(1)
}

/// Ports this process has handed out.
static PICKED: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// `n` consecutive free loopback ports below the ephemeral range.
fn free_ports(n: u16) -> Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.saturating_sub(n).max(10_001));
    let mut x = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(1)
        ^ (std::process::id() << 16);
    for _ in 0..500 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let p = low + (x % u32::from(high - low)) as u16;
        // A port picked earlier is still free until its agent binds it:
        // never hand it out twice.
        let mut taken = PICKED.lock().unwrap_or_else(|e| e.into_inner());
        let all_free = (0..n).all(|i| {
            !taken.contains(&(p + i)) && std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()
        });
        if all_free {
            taken.extend((0..n).map(|i| p + i));
            return Ok(p);
        }
    }
    bail!("cannot find {n} free loopback port(s) below {ephemeral_low}")
}

fn agent_toml(
    h: &LabHost,
    ca: &CaDir,
    images: &Path,
    bandwidth: u64,
    peers: &BTreeMap<HostName, SocketAddr>,
    lab_dir: &Path,
) -> String {
    let mut s = format!(
        "# Generated by `ferry lab up`; see docs/agent.sample.toml for every setting.\n\
         [host]\nname = \"{}\"\nlisten = \"{}\"\nstate_dir = \"{}\"\n\n{}\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\ncrl = \"{}\"\n\n\
         [qemu]\nimages_dir = \"{}\"\nmax_bandwidth_mib_s = {bandwidth}\n\n\
         [metrics]\nlisten = \"{}\"\n\n[peers]\n",
        h.name,
        h.addr,
        h.state_dir.display(),
        match h.migration {
            Some(m) => format!("[migration]\nlisten = \"{m}\"\n\n"),
            None => String::new(),
        },
        h.cert.display(),
        h.key.display(),
        ca.cert_path().display(),
        ca.crl_path().display(),
        images.display(),
        h.metrics,
    );
    for (name, addr) in peers.iter().filter(|(n, _)| **n != h.name) {
        s.push_str(&format!("{name} = \"{addr}\"\n"));
    }
    s.push_str(&format!(
        "\n[policy]\nfiles = [\"{}\"]\nentities = \"{}\"\n\n\
         [admission]\n# The lab moves VMs back and forth in quick succession.\nvm_cooldown = \"0s\"\n",
        lab_dir.join("policy/ferry.cedar").display(),
        lab_dir.join("policy/entities.json").display()
    ));
    match &h.tpm {
        Some(t) => s.push_str(&format!(
            "\n[attestation]\ntcti = \"{}\"\nak = \"{}\"\nregistry = \"{}\"\nreference_values = \"{}\"\n",
            t.tcti,
            t.ak.display(),
            lab_dir.join("aks").display(),
            lab_dir.join("reference-values.toml").display()
        )),
        None => s.push_str("\n[attestation]\n# INSECURE: `ferry lab up --insecure-no-tpm`\ninsecure_disabled = true\n"),
    }
    if h.libvirt.is_some() {
        s.push_str("\n[vmm]\n# libvirt's and Ferry's production paths, inside the host's namespace.\nbackend = \"libvirt\"\n");
    }
    s
}

/// Give a host a provisioned swtpm running on `port` (and its control
/// port, port + 1) and an enrolled AK, and add its current PCRs to the
/// lab's reference values.
fn provision_tpm(
    dir: &Path,
    hdir: &Path,
    name: &HostName,
    tpm_ca: &Path,
    tpm_ca_pem: &Path,
    port: u16,
) -> Result<LabTpm> {
    use ferry_attest::Swtpm;
    let tpm_dir = hdir.join("tpm");
    std::fs::create_dir_all(&tpm_dir)?;
    Swtpm::provision(&tpm_dir, tpm_ca)
        .with_context(|| format!("provisioning the swtpm of {name}"))?;
    let tpm =
        Swtpm::start(&tpm_dir, port).with_context(|| format!("starting the swtpm of {name}"))?;
    let tcti = tpm.tcti();
    // The swtpm outlives this command; `lab down` stops it.
    tpm.detach();
    let (blob, enrolled) = ferry_attest::enroll(&tcti, name, &[tpm_ca_pem.to_owned()])
        .with_context(|| format!("enrolling the AK of {name}"))?;
    let ak = hdir.join("ak.json");
    blob.save(&ak)?;
    let registry = dir.join("aks");
    std::fs::create_dir_all(&registry)?;
    ferry_attest::AkRegistry::insert(&registry, &enrolled)?;
    let values = ferry_attest::read_pcrs(&tcti, &ferry_attest::DEFAULT_PCR_SELECTION)?;
    crate::attest::add_reference(&dir.join("reference-values.toml"), "lab", name, &values)?;
    Ok(LabTpm { dir: tpm_dir, port, tcti, ak })
}

/// The example policy set and the lab's entities: every host in zone "lab"
/// with trust level 3, the operator admin with roles admin and operator.
fn write_policy(dir: &Path, hosts: &[LabHost]) -> Result<()> {
    let pdir = dir.join("policy");
    std::fs::create_dir_all(&pdir)?;
    std::fs::write(pdir.join("ferry.cedar"), EXAMPLE_POLICY)?;
    let mut entities: Vec<serde_json::Value> = hosts
        .iter()
        .map(|h| serde_json::json!({ "uid": { "type": "Host", "id": h.name }, "attrs": { "zone": "lab", "trust_level": 3 }, "parents": [] }))
        .collect();
    entities.push(serde_json::json!({
        "uid": { "type": "Operator", "id": "admin" },
        "attrs": { "roles": ["admin", "operator"], "tenants": ["default"] },
        "parents": []
    }));
    std::fs::write(pdir.join("entities.json"), serde_json::to_vec_pretty(&entities)?)?;
    Ok(())
}

/// docs/policy/ferry.cedar, shipped with the binary for the lab.
pub const EXAMPLE_POLICY: &str = include_str!("../../../docs/policy/ferry.cedar");

/// Run `f` inside the host's namespace, or here on loopback.
fn on_host<T: Send>(h: &LabHost, f: impl FnOnce() -> T + Send) -> Result<T> {
    match &h.netns {
        Some(ns) => lab_netns::in_netns(ns, f),
        None => Ok(f()),
    }
}

/// The agent's API listener accepts connections (probed from the operator's
/// namespace when the lab has namespaces).
fn listening(lab: &Lab, h: &LabHost) -> bool {
    let timeout = Duration::from_secs(1);
    match &lab.net {
        Some(net) => lab_netns::connect(&net.operator, h.addr, timeout).is_ok(),
        None => std::net::TcpStream::connect_timeout(&h.addr, timeout).is_ok(),
    }
}

/// Make sure a host's swtpm runs (after `lab down`, or a crash).
fn ensure_tpm(t: &LabTpm) -> Result<()> {
    if ferry_attest::Swtpm::adopt(&t.dir, t.port)?.is_none() {
        ferry_attest::Swtpm::start(&t.dir, t.port)?.detach();
    }
    Ok(())
}

pub async fn up(dir: &Path, opts: LabOptions) -> Result<Lab> {
    let hosts = opts.hosts;
    if !(1..=16).contains(&hosts) {
        bail!("--hosts must be between 1 and 16");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("lab.json").exists() || LabNet::load(&dir)?.is_some() {
        bail!(
            "{} already holds a lab; run `ferry lab down --dir {}` and remove it first",
            dir.display(),
            dir.display()
        );
    }
    let names = (1..=hosts).map(|i| format!("host{i}").parse()).collect::<Result<Vec<_>, _>>()?;
    let net = opts.netns.then(|| lab_netns::plan(&dir, &names));
    let made = match &net {
        Some(net) => lab_netns::create(&dir, net),
        None => Ok(()),
    };
    let lab = match made {
        Ok(()) => populate(&dir, opts, names, net).await,
        Err(e) => Err(e),
    };
    if lab.is_err() {
        // Leave nothing running and no namespace behind a failed `lab up`.
        let _ = down(&dir).await;
    }
    lab
}

async fn populate(
    dir: &Path,
    opts: LabOptions,
    names: Vec<HostName>,
    net: Option<LabNet>,
) -> Result<Lab> {
    let dir = dir.to_owned();
    let bandwidth = opts.bandwidth_mib_s;
    let domain: TrustDomain = "ferry.lab".parse()?;
    let ca = CaDir::init(&dir.join("ca"), &domain, 30)?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    ferry_guest::write_image(&images.join(GUEST_IMAGE))
        .context("cannot write the test guest image")?;
    let op_dir = dir.join("operator");
    std::fs::create_dir_all(&op_dir)?;
    let admin: OperatorName = "admin".parse()?;
    let op = ca.issue_operator(&admin, "admin", Validity::days(30), &op_dir)?;

    let tpm_ca = dir.join("tpm-ca");
    let tpm_ca_pem =
        if opts.tpm { Some(ferry_attest::Swtpm::manufacturer_ca_init(&tpm_ca)?) } else { None };
    let mut lab_hosts = Vec::new();
    let (mut libvirtds, mut tpms) = (lab_libvirt::Started::default(), StartedTpms::default());
    for (i, name) in (1..).zip(names) {
        let hdir = dir.join("hosts").join(name.as_str());
        std::fs::create_dir_all(&hdir)?;
        let issued = ca.issue_host(&name, Validity::days(30), &hdir)?;
        let nh = net.as_ref().map(|n| n.host(&name)).transpose()?;
        let tpm = match (&tpm_ca_pem, nh) {
            (Some(pem), Some(nh)) => Some(lab_netns::in_netns(&nh.netns, || {
                provision_tpm(&dir, &hdir, &name, &tpm_ca, pem, lab_netns::SWTPM_PORT)
            })??),
            (Some(pem), None) => {
                Some(provision_tpm(&dir, &hdir, &name, &tpm_ca, pem, free_ports(2)?)?)
            }
            (None, _) => None,
        };
        tpms.extend(tpm.as_ref().map(|t| t.dir.clone()));
        let libvirt = match opts.libvirt {
            true => Some(lab_libvirt::start(&hdir.join("libvirt"))?),
            false => None,
        };
        libvirtds.extend(libvirt.as_ref());
        // 127.0.0.0/8 is all loopback: each host's migration listener gets
        // an address of its own, which its peers allow and it leaves from.
        let (addr, migration, metrics) = match nh {
            Some(nh) => (
                SocketAddr::from((nh.mgmt, lab_netns::API_PORT)),
                Some(SocketAddr::from((nh.migration, lab_netns::MIGRATION_PORT))),
                SocketAddr::from((nh.mgmt, lab_netns::METRICS_PORT)),
            ),
            None => (
                SocketAddr::from(([127, 0, 0, 1], free_port()?)),
                match opts.two_planes {
                    true => Some(SocketAddr::from(([127, 0, 1, i as u8], free_port()?))),
                    false => None,
                },
                SocketAddr::from(([127, 0, 0, 1], free_port()?)),
            ),
        };
        lab_hosts.push(LabHost {
            addr,
            migration,
            metrics,
            netns: nh.map(|n| n.netns.clone()),
            config: hdir.join("agent.toml"),
            cert: issued.cert,
            key: issued.key,
            state_dir: hdir.join("state"),
            log: hdir.join("agent.log"),
            pid_file: hdir.join("agent.pid"),
            tpm,
            libvirt,
            name,
        });
    }
    let peers: BTreeMap<HostName, SocketAddr> =
        lab_hosts.iter().map(|h| (h.name.clone(), h.peer_addr())).collect();
    let agents: BTreeMap<HostName, SocketAddr> =
        lab_hosts.iter().map(|h| (h.name.clone(), h.addr)).collect();
    write_policy(&dir, &lab_hosts)?;
    for h in &lab_hosts {
        std::fs::write(&h.config, agent_toml(h, &ca, &images, bandwidth, &peers, &dir))?;
    }
    let client = ClientConfig {
        cert: op.cert.clone(),
        key: op.key.clone(),
        ca: ca.cert_path(),
        crl: Some(ca.crl_path()),
        default_host: lab_hosts.first().map(|h| h.name.clone()),
        agents,
        netns: net.as_ref().map(|n| n.operator.clone()),
    };
    let client_config = op_dir.join("client.toml");
    std::fs::write(&client_config, toml::to_string(&client)?)?;
    let lab = Lab {
        ca: ca.cert_path(),
        crl: ca.crl_path(),
        ca_dir: ca.dir().to_owned(),
        images_dir: images,
        guest_image: GUEST_IMAGE.into(),
        operator_cert: op.cert,
        operator_key: op.key,
        client_config,
        hosts: lab_hosts,
        ak_registry: opts.tpm.then(|| dir.join("aks")),
        reference_values: opts.tpm.then(|| dir.join("reference-values.toml")),
        tpm_manufacturer_ca: tpm_ca_pem,
        dir: dir.clone(),
        net,
    };
    std::fs::write(dir.join("lab.json"), serde_json::to_vec_pretty(&lab)?)?;
    libvirtds.keep();
    tpms.keep();
    for h in &lab.hosts {
        start_agent(&lab, h).await?;
    }
    Ok(lab)
}

/// Start a host's agent detached (its own process group, output to its
/// log) and wait until it answers an operator status request.
pub async fn start_agent(lab: &Lab, h: &LabHost) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    if let Some(t) = &h.tpm {
        on_host(h, || ensure_tpm(t))??;
    }
    // A killed agent can keep its listener open for a moment after its main
    // thread is already a zombie (the other threads still exiting). Probing
    // then would find the old agent and report the new one ready too early.
    let deadline = Instant::now() + Duration::from_secs(10);
    while listening(lab, h) {
        if Instant::now() > deadline {
            bail!("{} is still in use: is the agent of {} already running?", h.addr, h.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exe = std::env::current_exe().context("cannot find the ferry binary")?;
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&h.log)?;
    let mut command = match &h.libvirt {
        Some(lv) => {
            let enter = lab_libvirt::ensure(lv)?.enter();
            let mut c = std::process::Command::new(&enter[0]);
            c.args(&enter[1..]).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    command
        .args(["agent", "--config"])
        .arg(&h.config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    // The agent (and the QEMUs it starts) live in the host's namespace.
    let child = on_host(h, || command.spawn())?
        .with_context(|| format!("cannot start the agent of {}", h.name))?;
    let pid = child.id();
    std::fs::write(&h.pid_file, pid.to_string())?;
    // Ready when it listens: the agent binds only after loading its identity
    // and settling its VMs. (A TCP probe, not a status call, so an agent
    // deliberately given a bad certificate still counts as started.)
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if listening(lab, h) {
            return Ok(pid);
        }
        if !pid_alive(pid as i32) || Instant::now() > deadline {
            let tail = std::fs::read_to_string(&h.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("agent {} did not come up:\n{}", h.name, tail.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stop every agent, then every QEMU the lab's hosts run, then delete the
/// lab's namespaces (also those of a `lab up` that crashed half-way).
pub async fn down(dir: &Path) -> Result<()> {
    let lab = Lab::load(dir);
    if let Ok(lab) = &lab {
        stop_hosts(lab).await;
    }
    let deleted = lab_netns::destroy(dir)?;
    match lab {
        Err(_) if !deleted.is_empty() => Ok(()),
        other => other.map(drop),
    }
}

async fn stop_hosts(lab: &Lab) {
    for h in &lab.hosts {
        if let Some(pid) =
            std::fs::read_to_string(&h.pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok())
        {
            signal(pid, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while pid_alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if pid_alive(pid) {
                signal(pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_file(&h.pid_file);
        }
        let vms = h.state_dir.join("vms");
        if let Ok(entries) = std::fs::read_dir(&vms) {
            for e in entries.flatten() {
                if let Ok(Some(p)) = ferry_vmm::adopt(&e.path()).await {
                    let _ = tokio::task::spawn_blocking(move || p.kill()).await;
                }
            }
        }
        if let Some(t) = &h.tpm {
            let _ = on_host(h, || {
                if let Ok(Some(tpm)) = ferry_attest::Swtpm::adopt(&t.dir, t.port) {
                    tpm.stop();
                }
            });
        }
        if let Some(lv) = &h.libvirt {
            lab_libvirt::stop(lv);
        }
    }
}
