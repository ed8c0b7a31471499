//! `ferry ca`: the cluster CA. Produces plain PEM files that any PKI could
//! also supply.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_identity::{CaDir, RevokeTarget, Validity};
use ferry_types::{HostName, OperatorName, TrustDomain};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::opclient::ClientConfig;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a new CA (key, certificate and an empty CRL) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the cluster, e.g. ferry.example.
        #[arg(long, default_value = "ferry.local")]
        domain: TrustDomain,
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a host or operator certificate.
    #[command(subcommand)]
    Issue(IssueCommand),
    /// Revoke a certificate; the CRL is rewritten and agents honour it at their next connection.
    Revoke {
        #[arg(long)]
        ca: PathBuf,
        /// The certificate file to revoke.
        #[arg(long, conflicts_with = "serial", required_unless_present = "serial")]
        cert: Option<PathBuf>,
        /// The serial number (hex) to revoke.
        #[arg(long)]
        serial: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct IssueOpts {
    /// The CA directory.
    #[arg(long)]
    pub ca: PathBuf,
    /// Where to write NAME.pem, NAME.key and copies of the CA's ca.pem and
    /// crl.pem: everything the host or operator needs from the CA.
    #[arg(long)]
    pub out: PathBuf,
    /// Validity in days from now.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Explicit end of validity (RFC 3339); overrides --days. A past instant
    /// makes an expired certificate, for testing refusal.
    #[arg(long)]
    pub not_after: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum IssueCommand {
    /// A hypervisor host: spiffe://DOMAIN/host/NAME, server and client auth.
    Host {
        name: HostName,
        #[command(flatten)]
        opts: IssueOpts,
    },
    /// An operator: spiffe://DOMAIN/operator/NAME, client auth, with a role.
    /// Also writes OUT/client.toml (point FERRY_CLIENT_CONFIG at it).
    Operator {
        name: OperatorName,
        #[arg(long)]
        role: String,
        /// An agent the operator talks to, as NAME=ADDRESS:PORT (repeatable;
        /// written to client.toml's [agents] table).
        #[arg(long = "agent", value_parser = parse_agent)]
        agents: Vec<(HostName, SocketAddr)>,
        /// The agent commands talk to without --host (default: the first --agent).
        #[arg(long)]
        default_host: Option<HostName>,
        #[command(flatten)]
        opts: IssueOpts,
    },
}

/// `NAME=ADDRESS:PORT`, as in `--agent host1=10.0.0.1:7101`.
pub fn parse_agent(s: &str) -> Result<(HostName, SocketAddr), String> {
    let (name, addr) =
        s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=ADDRESS:PORT"))?;
    let name: HostName = name.parse().map_err(|e| format!("{name:?}: {e}"))?;
    let addr: SocketAddr =
        addr.parse().map_err(|e| format!("{addr:?} is not ADDRESS:PORT ({e})"))?;
    Ok((name, addr))
}

/// Copy the CA certificate and CRL next to an issued certificate, so that
/// one directory holds everything a host or an operator needs.
pub(crate) fn copy_ca_files(ca: &CaDir, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let copy = |from: PathBuf, name: &str| -> Result<PathBuf> {
        let to = out.join(name);
        // `--out` may be the CA directory itself.
        if to.exists() && from.canonicalize().ok() == to.canonicalize().ok() {
            return Ok(to);
        }
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        Ok(to)
    };
    Ok((copy(ca.cert_path(), "ca.pem")?, copy(ca.crl_path(), "crl.pem")?))
}

/// client.toml for an operator: paths relative to its own directory, so
/// the directory can be moved to the operator's machine as it is.
fn write_client_config(
    out: &Path,
    name: &OperatorName,
    agents: &[(HostName, SocketAddr)],
    default_host: Option<HostName>,
) -> Result<PathBuf> {
    let default_host = default_host.or_else(|| agents.first().map(|(h, _)| h.clone()));
    if let Some(h) = &default_host {
        if !agents.iter().any(|(a, _)| a == h) {
            bail!("--default-host {h} is not one of the --agent hosts");
        }
    }
    let cfg = ClientConfig {
        cert: format!("{name}.pem").into(),
        key: format!("{name}.key").into(),
        ca: "ca.pem".into(),
        crl: Some("crl.pem".into()),
        default_host,
        agents: agents.iter().cloned().collect(),
        netns: None,
    };
    let path = out.join("client.toml");
    let text = format!(
        "# Written by `ferry ca issue operator`; paths are relative to this file.\n\
         # Use it with: export FERRY_CLIENT_CONFIG=/path/to/this/client.toml\n{}",
        toml::to_string(&cfg)?
    );
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn validity(opts: &IssueOpts) -> Result<Validity> {
    let mut v = Validity::days(opts.days);
    if let Some(s) = &opts.not_after {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .with_context(|| format!("--not-after {s:?} is not RFC 3339"))?;
        v.not_after = t;
        if v.not_before >= t {
            v.not_before = t - time::Duration::days(2);
        }
    }
    Ok(v)
}

pub fn run(cmd: CaCommand, json: bool) -> Result<ExitCode> {
    let out = match cmd {
        CaCommand::Init { dir, domain, days } => {
            let ca = CaDir::init(&dir, &domain, days)
                .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
            serde_json::json!({ "ca": ca.cert_path(), "crl": ca.crl_path(), "domain": domain.as_str() })
        }
        CaCommand::Issue(IssueCommand::Host { name, opts }) => {
            let ca = CaDir::open(&opts.ca)
                .with_context(|| format!("cannot open the CA in {}", opts.ca.display()))?;
            std::fs::create_dir_all(&opts.out)
                .with_context(|| format!("cannot create {}", opts.out.display()))?;
            let c = ca.issue_host(&name, validity(&opts)?, &opts.out)?;
            let (ca_pem, crl) = copy_ca_files(&ca, &opts.out)?;
            serde_json::json!({ "cert": c.cert, "key": c.key, "ca": ca_pem, "crl": crl, "serial": c.serial, "spiffe": c.spiffe.to_string() })
        }
        CaCommand::Issue(IssueCommand::Operator { name, role, agents, default_host, opts }) => {
            let ca = CaDir::open(&opts.ca)
                .with_context(|| format!("cannot open the CA in {}", opts.ca.display()))?;
            std::fs::create_dir_all(&opts.out)
                .with_context(|| format!("cannot create {}", opts.out.display()))?;
            let c = ca.issue_operator(&name, &role, validity(&opts)?, &opts.out)?;
            let (ca_pem, crl) = copy_ca_files(&ca, &opts.out)?;
            let client = write_client_config(&opts.out, &name, &agents, default_host)?;
            serde_json::json!({ "cert": c.cert, "key": c.key, "ca": ca_pem, "crl": crl, "client_config": client, "serial": c.serial, "spiffe": c.spiffe.to_string(), "role": role })
        }
        CaCommand::Revoke { ca, cert, serial } => {
            let dir = CaDir::open(&ca)
                .with_context(|| format!("cannot open the CA in {}", ca.display()))?;
            let target = match (cert, serial) {
                (Some(c), _) => RevokeTarget::CertFile(c),
                (None, Some(s)) => RevokeTarget::Serial(s),
                (None, None) => anyhow::bail!("give --cert or --serial"),
            };
            dir.revoke(target.clone())?;
            serde_json::json!({ "revoked": format!("{target:?}"), "crl": dir.crl_path() })
        }
    };
    if json {
        outln!("{out}");
    } else if let Some(obj) = out.as_object() {
        for (k, v) in obj {
            outln!("{k:>13}: {}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(ExitCode::SUCCESS)
}
