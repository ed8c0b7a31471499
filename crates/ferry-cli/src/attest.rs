//! `ferry attest`: enrol a host's TPM attestation key, read its PCRs for
//! reference values, and (lab and tests only) extend a PCR to play a
//! compromised platform.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use ferry_attest::{AkRegistry, ReferenceValues, DEFAULT_PCR_SELECTION};
use ferry_types::HostName;

#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Create an attestation key in this host's TPM and prove, by credential
    /// activation against the EK whose certificate chains to a trusted TPM
    /// manufacturer CA, that it lives there; record it in the AK registry.
    Enroll {
        #[arg(long)]
        host: HostName,
        /// TPM access: device:/dev/tpmrm0, or swtpm:host=127.0.0.1,port=P.
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
        /// Trusted TPM manufacturer CA certificates (PEM), repeatable.
        #[arg(long = "manufacturer-ca", required = true)]
        manufacturer_cas: Vec<PathBuf>,
        /// Where this host keeps its AK (0600).
        #[arg(long)]
        ak_out: PathBuf,
        /// The cluster's registry of enrolled AKs (one file per host).
        #[arg(long)]
        registry: PathBuf,
    },
    /// Print this host's current PCR values (SHA-256 bank), optionally adding
    /// them to a reference-values file as the host's class.
    Measure {
        #[arg(long, default_value = "device:/dev/tpmrm0")]
        tcti: String,
        /// PCRs to read (comma separated).
        #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_PCR_SELECTION.to_vec())]
        pcrs: Vec<u8>,
        /// Reference-values file to add these values to (created if missing).
        #[arg(long, requires_all = ["class", "host"])]
        add_to: Option<PathBuf>,
        #[arg(long)]
        class: Option<String>,
        #[arg(long)]
        host: Option<HostName>,
    },
    /// Merge reference-value files (each host's, from `ferry host init` or
    /// `measure --add-to`) into one for the cluster. A class defined twice
    /// with different values, or a host in two classes, is refused.
    Merge {
        /// The cluster's file (created if missing).
        #[arg(long)]
        into: PathBuf,
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// TESTING ONLY: extend a PCR with a measurement, as a compromised
    /// platform would show. Every later quote from this TPM fails verification.
    Extend {
        #[arg(long)]
        tcti: String,
        #[arg(long)]
        pcr: u8,
        #[arg(long, default_value = "ferry: unexpected measurement")]
        data: String,
    },
}

pub fn run(cmd: AttestCommand, json: bool) -> Result<ExitCode> {
    let out = match cmd {
        AttestCommand::Enroll { host, tcti, manufacturer_cas, ak_out, registry } => {
            let (blob, enrolled) = ferry_attest::enroll(&tcti, &host, &manufacturer_cas)
                .with_context(|| format!("enrolling the AK of {host}"))?;
            blob.save(&ak_out)?;
            std::fs::create_dir_all(&registry)
                .with_context(|| format!("cannot create {}", registry.display()))?;
            AkRegistry::insert(&registry, &enrolled)?;
            serde_json::json!({ "host": host, "ak": ak_out, "registry": registry, "ek_cert_sha256": enrolled.ek_cert_sha256 })
        }
        AttestCommand::Measure { tcti, pcrs, add_to, class, host } => {
            let values = ferry_attest::read_pcrs(&tcti, &pcrs).context("reading PCRs")?;
            if let (Some(path), Some(class), Some(host)) = (&add_to, &class, &host) {
                add_reference(path, class, host, &values)?;
            }
            let shown: BTreeMap<String, String> =
                values.iter().map(|(k, v)| (k.to_string(), hex::encode(v))).collect();
            serde_json::json!({ "tcti": tcti, "pcrs": shown, "added_to": add_to })
        }
        AttestCommand::Merge { into, files } => {
            let mut all =
                if into.exists() { ReferenceValues::load(&into)? } else { ReferenceValues::new() };
            for f in &files {
                let one = ReferenceValues::load(f)?;
                all.merge(&one).map_err(|why| anyhow!("{}: {why}", f.display()))?;
            }
            all.save(&into)?;
            serde_json::json!({ "merged": files, "into": into })
        }
        AttestCommand::Extend { tcti, pcr, data } => {
            eprintln!("warning: extending PCR {pcr} of {tcti}: this platform will fail attestation from now on");
            ferry_attest::extend_pcr(&tcti, pcr, data.as_bytes())?;
            serde_json::json!({ "extended": pcr, "tcti": tcti })
        }
    };
    if json {
        outln!("{out}");
    } else {
        print_text(&out);
    }
    Ok(ExitCode::SUCCESS)
}

/// One `key: value` line per field; PCRs one per line.
fn print_text(out: &serde_json::Value) {
    let Some(obj) = out.as_object() else { return };
    for (k, v) in obj {
        match v {
            serde_json::Value::Null => {}
            serde_json::Value::Object(pcrs) => {
                outln!("{k}:");
                for (pcr, value) in pcrs {
                    outln!("  {pcr:>2} {}", value.as_str().unwrap_or_default());
                }
            }
            serde_json::Value::String(s) => outln!("{k}: {s}"),
            other => outln!("{k}: {other}"),
        }
    }
}

/// Add `host` as a member of `class` with these values to a reference file.
pub fn add_reference(
    path: &std::path::Path,
    class: &str,
    host: &HostName,
    values: &BTreeMap<u8, [u8; 32]>,
) -> Result<()> {
    let mut refs =
        if path.exists() { ReferenceValues::load(path)? } else { ReferenceValues::new() };
    refs.set_class(class, values.clone())?;
    refs.assign(host.clone(), class);
    refs.save(path)?;
    Ok(())
}
