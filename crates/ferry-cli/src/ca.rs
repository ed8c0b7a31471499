//! `ferry ca`: the cluster CA. Produces plain PEM files that any PKI could
//! also supply.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use ferry_identity::{CaDir, RevokeTarget, Validity};
use ferry_types::{HostName, OperatorName, TrustDomain};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

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
    /// Where to write NAME.pem and NAME.key.
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
    Operator {
        name: OperatorName,
        #[arg(long)]
        role: String,
        #[command(flatten)]
        opts: IssueOpts,
    },
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
            serde_json::json!({ "cert": c.cert, "key": c.key, "serial": c.serial, "spiffe": c.spiffe.to_string() })
        }
        CaCommand::Issue(IssueCommand::Operator { name, role, opts }) => {
            let ca = CaDir::open(&opts.ca)
                .with_context(|| format!("cannot open the CA in {}", opts.ca.display()))?;
            std::fs::create_dir_all(&opts.out)
                .with_context(|| format!("cannot create {}", opts.out.display()))?;
            let c = ca.issue_operator(&name, &role, validity(&opts)?, &opts.out)?;
            serde_json::json!({ "cert": c.cert, "key": c.key, "serial": c.serial, "spiffe": c.spiffe.to_string(), "role": role })
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
            outln!("{k:>8}: {}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string()));
        }
    }
    Ok(ExitCode::SUCCESS)
}
