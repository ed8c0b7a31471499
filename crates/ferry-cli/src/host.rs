//! `ferry host init`: prepare one hypervisor host, as docs/deploy.md
//! describes. It checks (or issues) the host's certificate, enrols its TPM,
//! records its PCRs as reference values and writes its agent.toml from
//! docs/agent.sample.toml, so the guide and the files cannot drift apart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_agent::preflight::{self, Verdict};
use ferry_agent::AgentConfig;
use ferry_attest::{AkBlob, AkRegistry, DEFAULT_PCR_SELECTION};
use ferry_types::HostName;

/// docs/agent.sample.toml: the config this command fills in.
pub const SAMPLE_CONFIG: &str = include_str!("../../../docs/agent.sample.toml");

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Prepare this host: certificate, TPM enrolment, reference values, agent.toml.
    Init(InitArgs),
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// This host's name (as in its certificate).
    #[arg(long)]
    pub name: HostName,
    /// Every host of the cluster, this one included, as NAME=ADDRESS:PORT
    /// (comma separated): this host listens on its own address, the others
    /// become its [peers].
    #[arg(long, value_delimiter = ',', required = true, value_parser = crate::ca::parse_agent)]
    pub hosts: Vec<(HostName, SocketAddr)>,
    /// Where the host's configuration lives: NAME.pem, NAME.key, ca.pem and
    /// crl.pem from the CA are expected here; ak.json, aks/,
    /// reference-values.toml and agent.toml are written here.
    #[arg(long, default_value = "/etc/ferry")]
    pub config_dir: PathBuf,
    /// The agent's state: VMs, migration records, the audit log, images/.
    #[arg(long, default_value = "/var/lib/ferry")]
    pub state_dir: PathBuf,
    /// Issue the certificate here with this CA directory instead of expecting
    /// one from the CA machine (only where the CA key may live on this host).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// TPM access: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=P.
    #[arg(long, default_value = "device:/dev/tpmrm0")]
    pub tcti: String,
    /// CA certificates (PEM) of the TPM's manufacturer that the EK
    /// certificate must chain to (repeatable; a root and its intermediate).
    #[arg(long = "manufacturer-ca", required = true)]
    pub manufacturer_cas: Vec<PathBuf>,
    /// Reference-value class for this host's PCRs (hosts of one model and
    /// firmware can share one); default: the host's name.
    #[arg(long)]
    pub class: Option<String>,
    /// Prometheus metrics address (plain HTTP: loopback or a management network).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: SocketAddr,
    /// Overwrite an existing agent.toml.
    #[arg(long)]
    pub force: bool,
}

/// This host's values for the sample config.
#[derive(Debug, Clone)]
pub struct HostValues {
    pub name: HostName,
    pub listen: SocketAddr,
    pub peers: Vec<(HostName, SocketAddr)>,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub tcti: String,
    pub metrics: SocketAddr,
}

impl HostValues {
    fn etc(&self, file: &str) -> String {
        self.config_dir.join(file).display().to_string()
    }
    fn state(&self, file: &str) -> String {
        self.state_dir.join(file).display().to_string()
    }
}

/// docs/agent.sample.toml with this host's values, its comments kept.
pub fn render_agent_config(v: &HostValues) -> Result<String> {
    let mut doc: toml_edit::DocumentMut =
        SAMPLE_CONFIG.parse().context("docs/agent.sample.toml does not parse")?;
    let name = v.name.as_str();
    let set: [(&str, &str, String); 15] = [
        ("host", "name", name.to_owned()),
        ("host", "listen", v.listen.to_string()),
        ("host", "state_dir", v.state_dir.display().to_string()),
        ("tls", "cert", v.etc(&format!("{name}.pem"))),
        ("tls", "key", v.etc(&format!("{name}.key"))),
        ("tls", "ca", v.etc("ca.pem")),
        ("tls", "crl", v.etc("crl.pem")),
        ("qemu", "images_dir", v.state("images")),
        ("attestation", "tcti", v.tcti.clone()),
        ("attestation", "ak", v.etc("ak.json")),
        ("attestation", "registry", v.etc("aks")),
        ("attestation", "reference_values", v.etc("reference-values.toml")),
        ("audit", "log", v.state("audit.log")),
        ("policy", "entities", v.etc("policy/entities.json")),
        ("metrics", "listen", v.metrics.to_string()),
    ];
    for (table, key, value) in set {
        let item = doc
            .get_mut(table)
            .and_then(|t| t.get_mut(key))
            .ok_or_else(|| anyhow!("docs/agent.sample.toml has no {table}.{key}"))?;
        *item = toml_edit::value(value);
    }
    doc["policy"]["files"] =
        toml_edit::value(toml_edit::Array::from_iter([v.etc("policy/ferry.cedar")]));
    let peers = doc
        .get_mut("peers")
        .and_then(|p| p.as_table_mut())
        .ok_or_else(|| anyhow!("docs/agent.sample.toml has no [peers] table"))?;
    let sample_peers: Vec<String> = peers.iter().map(|(k, _)| k.to_owned()).collect();
    for k in sample_peers {
        peers.remove(&k);
    }
    for (peer, addr) in &v.peers {
        peers.insert(peer.as_str(), toml_edit::value(addr.to_string()));
    }
    let text =
        format!("# Written by `ferry host init` for {name} from docs/agent.sample.toml.\n{}", doc);
    // What is written must be what the agent accepts.
    AgentConfig::parse(&text, Path::new("agent.toml"))
        .map_err(|e| anyhow!(ferry_agent::report(&e)))?;
    Ok(text)
}

/// Split `--hosts` into this host's address and its peers.
pub fn split_hosts(
    name: &HostName,
    hosts: &[(HostName, SocketAddr)],
) -> Result<(SocketAddr, Vec<(HostName, SocketAddr)>)> {
    let mut own = None;
    let mut peers = Vec::new();
    for (h, addr) in hosts {
        if h == name {
            own = Some(*addr);
        } else if peers.iter().any(|(p, _)| p == h) {
            bail!("--hosts names {h} twice");
        } else {
            peers.push((h.clone(), *addr));
        }
    }
    let own = own.ok_or_else(|| anyhow!("--hosts does not name this host ({name})"))?;
    Ok((own, peers))
}

fn fail_on(check: preflight::Check) -> Result<preflight::Check> {
    if check.verdict == Verdict::Fail {
        bail!("{}: {}\n  fix: {}", check.name, check.detail, check.fix.unwrap_or_default());
    }
    Ok(check)
}

/// The certificate from the CA machine (or issued here), checked as the
/// agent will check it.
fn certificate(a: &InitArgs) -> Result<Vec<preflight::Check>> {
    let cert = a.config_dir.join(format!("{}.pem", a.name));
    let key = a.config_dir.join(format!("{}.key", a.name));
    let ca = a.config_dir.join("ca.pem");
    if let Some(dir) = &a.ca_dir {
        if cert.exists() {
            bail!(
                "{} exists; remove --ca-dir to use it, or delete it to issue anew",
                cert.display()
            );
        }
        let ca_dir = ferry_identity::CaDir::open(dir)
            .with_context(|| format!("cannot open the CA in {}", dir.display()))?;
        ca_dir.issue_host(&a.name, ferry_identity::Validity::days(365), &a.config_dir)?;
        crate::ca::copy_ca_files(&ca_dir, &a.config_dir)?;
    }
    let (loaded, problem) = match ferry_identity::Identity::load(&cert, &key, &ca, None) {
        Ok(id) => (Ok(id.spiffe().clone()), id.chain_problem()),
        Err(e) => (Err(ferry_agent::report(&e)), None),
    };
    let first = fail_on(preflight::certificate(&a.name, &cert, &loaded))?;
    Ok(vec![first, fail_on(preflight::ca(&cert, &ca, problem.as_ref()))?])
}

/// Enrol unless this TPM already holds the AK the registry names.
fn enrol(a: &InitArgs) -> Result<&'static str> {
    let ak_path = a.config_dir.join("ak.json");
    let registry = a.config_dir.join("aks");
    if let Ok(blob) = AkBlob::load(&ak_path) {
        let enrolled = AkRegistry::load(&registry)?.get(&a.name).map(|e| e.ak_name.clone());
        let loads = ferry_attest::Attester::open(&a.tcti, &blob).is_ok();
        if loads && enrolled == Some(blob.name()) {
            return Ok("already enrolled");
        }
    }
    let (blob, enrolled) = ferry_attest::enroll(&a.tcti, &a.name, &a.manufacturer_cas)
        .with_context(|| format!("enrolling the TPM of {}", a.name))?;
    blob.save(&ak_path)?;
    AkRegistry::insert(&registry, &enrolled)?;
    Ok("enrolled")
}

pub fn run(cmd: HostCommand, json: bool) -> Result<ExitCode> {
    let HostCommand::Init(mut a) = cmd;
    a.config_dir = std::path::absolute(&a.config_dir)?;
    a.state_dir = std::path::absolute(&a.state_dir)?;
    let (listen, peers) = split_hosts(&a.name, &a.hosts)?;
    let config = a.config_dir.join("agent.toml");
    if config.exists() && !a.force {
        bail!("{} exists; pass --force to write it anew", config.display());
    }
    std::fs::create_dir_all(&a.config_dir)
        .with_context(|| format!("cannot create {}", a.config_dir.display()))?;
    let mut checks = certificate(&a)?;
    let enrolment = enrol(&a)?;
    let values = ferry_attest::read_pcrs(&a.tcti, &DEFAULT_PCR_SELECTION)?;
    let class = a.class.clone().unwrap_or_else(|| a.name.to_string());
    let refs = a.config_dir.join("reference-values.toml");
    crate::attest::add_reference(&refs, &class, &a.name, &values)?;
    let images = a.state_dir.join("images");
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let v = HostValues {
        name: a.name.clone(),
        listen,
        peers,
        config_dir: a.config_dir.clone(),
        state_dir: a.state_dir.clone(),
        tcti: a.tcti.clone(),
        metrics: a.metrics,
    };
    std::fs::write(&config, render_agent_config(&v)?)
        .with_context(|| format!("cannot write {}", config.display()))?;
    checks.push(preflight::tpm(&preflight::TpmFacts::Ready { tcti: a.tcti.clone() }));
    let out = serde_json::json!({
        "host": a.name,
        "config": config,
        "tpm": enrolment,
        "ak_record": a.config_dir.join("aks").join(format!("{}.json", a.name)),
        "reference_values": refs,
        "class": class,
        "images_dir": images,
        "checks": checks,
    });
    if json {
        outln!("{out}");
    } else {
        outln!("{}: TPM {enrolment} ({}), PCRs recorded as class {class:?}", a.name, a.tcti);
        outln!("  agent config      {}", config.display());
        outln!("  AK record         {}/aks/{}.json", a.config_dir.display(), a.name);
        outln!("  reference values  {}", refs.display());
        outln!("  images            {} (put the VM images here)", images.display());
        outln!(
            "next: merge every host's AK record and reference values on the admin machine and \
             copy them, with the policy, to every host (docs/deploy.md)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> HostValues {
        HostValues {
            name: "host2".parse().expect("name"),
            listen: "10.0.0.2:7101".parse().expect("addr"),
            peers: vec![
                ("host1".parse().expect("name"), "10.0.0.1:7101".parse().expect("addr")),
                ("host3".parse().expect("name"), "10.0.0.3:7101".parse().expect("addr")),
            ],
            config_dir: "/etc/ferry".into(),
            state_dir: "/srv/ferry".into(),
            tcti: "swtpm:host=127.0.0.1,port=2321".into(),
            metrics: "127.0.0.1:9464".parse().expect("addr"),
        }
    }

    #[test]
    fn the_agent_config_is_the_sample_with_this_hosts_values() {
        let text = render_agent_config(&values()).expect("render");
        let cfg = AgentConfig::parse(&text, Path::new("t.toml")).expect("parses");
        assert_eq!(cfg.host.name.as_str(), "host2");
        assert_eq!(cfg.host.listen.to_string(), "10.0.0.2:7101");
        assert_eq!(cfg.tls.cert, Path::new("/etc/ferry/host2.pem"));
        assert_eq!(cfg.qemu.images_dir, Path::new("/srv/ferry/images"));
        assert_eq!(cfg.audit_log_path(), Path::new("/srv/ferry/audit.log"));
        assert_eq!(cfg.attestation.tcti.as_deref(), Some("swtpm:host=127.0.0.1,port=2321"));
        assert_eq!(cfg.policy.files, [PathBuf::from("/etc/ferry/policy/ferry.cedar")]);
        let peers: Vec<String> = cfg.peers.iter().map(|(h, a)| format!("{h}={a}")).collect();
        assert_eq!(peers, ["host1=10.0.0.1:7101", "host3=10.0.0.3:7101"]);
        // The sample's explanations stay with the values.
        assert!(text.contains("Unknown keys are"), "header comment kept");
        assert!(text.contains("# Migration bandwidth cap in MiB/s"), "comments kept");
        assert!(!text.contains("host2 = \"10.0.0.2:7101\""), "the sample's peer is gone");
    }

    #[test]
    fn hosts_must_name_this_host_once() {
        let me: HostName = "host1".parse().expect("name");
        let hosts = |s: &str| -> Vec<(HostName, SocketAddr)> {
            s.split(',').map(|h| crate::ca::parse_agent(h).expect("parse")).collect()
        };
        let (own, peers) =
            split_hosts(&me, &hosts("host1=10.0.0.1:7101,host2=10.0.0.2:7101")).expect("split");
        assert_eq!(own.to_string(), "10.0.0.1:7101");
        assert_eq!(peers.len(), 1);
        let e = split_hosts(&me, &hosts("host2=10.0.0.2:7101")).expect_err("missing");
        assert!(e.to_string().contains("does not name this host (host1)"), "{e}");
        let e = split_hosts(&me, &hosts("host1=1.1.1.1:1,host2=1.1.1.2:1,host2=1.1.1.3:1"))
            .expect_err("twice");
        assert!(e.to_string().contains("names host2 twice"), "{e}");
        assert!(crate::ca::parse_agent("host1:7101").is_err());
    }
}
