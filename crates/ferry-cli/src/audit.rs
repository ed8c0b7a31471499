//! `ferry audit`: read, verify and export the signed, hash-chained audit
//! logs the agents keep. Verification needs only the cluster CA certificate.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_audit::CaTrust;

/// Largest audit log `show` reads.
const MAX_SHOW_LOG: u64 = 1 << 30;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print a log's records (one line each, or JSON lines with --json).
    Show {
        /// An agent's audit log (default: <state_dir>/audit.log).
        log: PathBuf,
        /// Only records about this migration.
        #[arg(long)]
        migration: Option<String>,
    },
    /// Check chain and signatures of each log; with a source's and a
    /// destination's log, also that they agree on every migration in both.
    Verify {
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// The cluster CA certificate: all a verifier needs.
        #[arg(long)]
        ca: PathBuf,
    },
    /// Write the evidence bundle of one migration from the logs that mention it.
    Export {
        migration_id: String,
        #[arg(long = "log", required = true)]
        logs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Verify an evidence bundle offline with only the CA certificate.
    VerifyBundle {
        bundle: PathBuf,
        #[arg(long)]
        ca: PathBuf,
    },
}

pub fn run(cmd: AuditCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Show { log, migration } => show(&log, migration.as_deref(), json),
        AuditCommand::Verify { logs, ca } => {
            let ca = CaTrust::load(&ca)?;
            let mut summaries = Vec::new();
            for log in &logs {
                let s = ferry_audit::verify_log(log, &ca)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", log.display()))?;
                if !json {
                    outln!(
                        "{}: {} records by {}, intact; head seq {} {}",
                        log.display(),
                        s.records,
                        s.host,
                        s.head.seq,
                        s.head.hash
                    );
                }
                summaries.push(serde_json::to_value(&s)?);
            }
            let mut cross = None;
            if logs.len() == 2 {
                let c = ferry_audit::cross_check(&logs[0], &logs[1], &ca)
                    .map_err(|e| anyhow::anyhow!("cross-check: {e}"))?;
                if !json {
                    for m in &c.migrations {
                        outln!(
                            "migration {}: {} (agreed: {})",
                            m.migration_id,
                            m.outcome,
                            m.agreed.join(", ")
                        );
                    }
                    for w in &c.warnings {
                        outln!("warning: {w}");
                    }
                }
                cross = Some(serde_json::to_value(&c)?);
            }
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "verified": true, "logs": summaries, "cross_check": cross })
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export { migration_id, logs, out } => {
            let bundle = ferry_audit::export_bundle(&logs, &migration_id)?;
            std::fs::write(&out, serde_json::to_vec_pretty(&bundle)?)
                .with_context(|| format!("cannot write {}", out.display()))?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "bundle": out, "messages": bundle.messages.len() })
                );
            } else {
                outln!(
                    "evidence for {migration_id}: {} signed messages -> {}",
                    bundle.messages.len(),
                    out.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::VerifyBundle { bundle, ca } => {
            let ca = CaTrust::load(&ca)?;
            let text = std::fs::read(&bundle)
                .with_context(|| format!("cannot read {}", bundle.display()))?;
            let b: ferry_audit::EvidenceBundle = serde_json::from_slice(&text)
                .with_context(|| format!("{} is not an evidence bundle", bundle.display()))?;
            let s = ferry_audit::verify_bundle(&b, &ca)
                .map_err(|e| anyhow::anyhow!("{}: {e}", bundle.display()))?;
            if json {
                outln!("{}", serde_json::to_string(&s)?);
            } else {
                outln!(
                    "migration {}: {} ({} -> {}), messages {}",
                    s.migration_id,
                    s.outcome,
                    s.source.as_deref().unwrap_or("?"),
                    s.destination.as_deref().unwrap_or("?"),
                    s.messages.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn show(log: &std::path::Path, migration: Option<&str>, json: bool) -> Result<ExitCode> {
    let len =
        std::fs::metadata(log).with_context(|| format!("cannot read {}", log.display()))?.len();
    if len > MAX_SHOW_LOG {
        bail!("{} is {len} bytes; use `ferry audit export` for one migration", log.display());
    }
    let text =
        std::fs::read_to_string(log).with_context(|| format!("cannot read {}", log.display()))?;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} holds a malformed line", log.display()))?;
        let rec = &v["record"];
        let ev = &rec["event"];
        if migration.is_some_and(|m| ev["migration_id"].as_str() != Some(m)) {
            continue;
        }
        if json {
            outln!("{line}");
        } else {
            outln!(
                "{:>5} {} {:<18} {} {} {}",
                rec["seq"],
                rec["ts"].as_str().unwrap_or(""),
                ev["kind"].as_str().unwrap_or(""),
                ev["migration_id"].as_str().unwrap_or("-"),
                ev["vm"].as_str().unwrap_or("-"),
                ev["peer"].as_str().unwrap_or("-"),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
