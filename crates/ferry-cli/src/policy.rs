//! `ferry policy`: check policy files against Ferry's Cedar schema, explain
//! a decision, and ask an agent to reload its policy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Result};
use clap::Subcommand;
use ferry_agent::protocol::{ApiRequest, ApiResponse};
use ferry_policy::{Action, PolicyEngine, Principal, Request, VmLabels};
use ferry_types::{HostName, OperatorName, VmName};

use crate::ops::Target;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate policy files (and an entities file) against the schema.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        entities: Option<PathBuf>,
    },
    /// Print the decision for an operator migrating a VM, and the policies
    /// that made it. Exit status 0 when allowed, 3 when denied.
    Explain {
        #[arg(long = "policy", required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        entities: PathBuf,
        #[arg(long)]
        operator: OperatorName,
        #[arg(long, default_value = "operator")]
        role: String,
        #[arg(long)]
        vm: VmName,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long, default_value_t = 0)]
        security_level: u8,
        #[arg(long = "zone")]
        zones: Vec<String>,
        #[arg(long)]
        from: HostName,
        #[arg(long)]
        to: HostName,
        #[arg(long)]
        postcopy: bool,
        /// Decide as if the source's platform were not attested (attestation off there).
        #[arg(long)]
        source_unattested: bool,
        /// Decide as if the destination's platform were not attested.
        #[arg(long)]
        destination_unattested: bool,
    },
    /// Ask an agent to reload its policy files (as SIGHUP does).
    Reload(Target),
    /// Print the example policy set (docs/policy/ferry.cedar) to start from.
    Example,
}

pub async fn run(cmd: PolicyCommand, json: bool) -> Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { files, entities } => {
            let summary = ferry_policy::check_files(&files, entities.as_deref())?;
            if json {
                let ids: Vec<_> = summary.policies.iter().map(|p| p.id.clone()).collect();
                outln!(
                    "{}",
                    serde_json::json!({ "valid": true, "policies": ids, "entities": summary.entities, "warnings": summary.warnings })
                );
            } else {
                out!("{summary}");
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain {
            files,
            entities,
            operator,
            role,
            vm,
            tenant,
            security_level,
            zones,
            from,
            to,
            postcopy,
            source_unattested,
            destination_unattested,
        } => {
            let engine = PolicyEngine::load(&files, &entities)?;
            let req = Request {
                principal: Principal::Operator { name: operator, role },
                action: Action::MigrateVm,
                vm,
                labels: VmLabels {
                    tenant,
                    security_level,
                    allowed_zones: zones,
                    anti_affinity: vec![],
                },
                source: from,
                destination: to,
                postcopy,
                source_attested: !source_unattested,
                destination_attested: !destination_unattested,
                now_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
                resident_on_destination: vec![],
            };
            let decision = engine.authorize(&req);
            if json {
                let (allow, reason) = match &decision {
                    ferry_policy::Decision::Allow { .. } => (true, None),
                    ferry_policy::Decision::Deny { reason, .. } => (false, Some(reason.clone())),
                };
                outln!(
                    "{}",
                    serde_json::json!({ "allow": allow, "reason": reason, "policies": decision.policies() })
                );
            } else {
                outln!("{}", engine.explain(&req));
            }
            Ok(if decision.is_allow() { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        PolicyCommand::Example => {
            crate::out::write_bytes(crate::lab::EXAMPLE_POLICY.as_bytes());
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Reload(t) => {
            let (c, host) = t.open()?;
            match c.request(&host, &ApiRequest::PolicyReload, |_| {}).await? {
                ApiResponse::PolicyReloaded { policies } => {
                    if json {
                        outln!("{}", serde_json::json!({ "reloaded": true, "policies": policies }));
                    } else {
                        outln!("{host}: policy reloaded ({policies} policies)");
                    }
                    Ok(ExitCode::SUCCESS)
                }
                ApiResponse::Error { message, .. } => Err(anyhow!("{host}: {message}")),
                other => Err(anyhow!("unexpected answer {other:?}")),
            }
        }
    }
}
