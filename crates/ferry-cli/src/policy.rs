//! `ferry policy`: check policy files against Ferry's Cedar schema, explain
//! a decision, and ask an agent to reload its policy.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::{Subcommand, ValueEnum};
use ferry_agent::protocol::{ApiRequest, ApiResponse};
use ferry_policy::{Action, PolicyEngine, Principal, Request, Resident, VmLabels};
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
    /// Print the decision for a request, and the policies (and resident VMs) that made it.
    /// Exit status 0 when allowed, 3 when denied.
    ///
    /// By default an operator asks to migrate a VM (MigrateVm, decided on the
    /// source). `--action receive-vm` asks as the destination does, with the
    /// VMs already there given by `--resident`; `start-vm` as `ferry vm start` does.
    Explain(Box<ExplainArgs>),
    /// Ask an agent to reload its policy files (as SIGHUP does).
    Reload(Target),
    /// Print the example policy set (docs/policy/ferry.cedar) to start from.
    Example,
}

/// The Cedar action to explain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExplainAction {
    /// An operator asks the source to migrate the VM.
    MigrateVm,
    /// The source host sends the VM.
    SendVm,
    /// The destination host receives the VM, next to its `--resident` VMs.
    ReceiveVm,
    /// `ferry vm start` on `--to`, next to its `--resident` VMs.
    StartVm,
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[arg(long = "policy", required = true)]
    files: Vec<PathBuf>,
    #[arg(long)]
    entities: PathBuf,
    #[arg(long, value_enum, default_value_t = ExplainAction::MigrateVm)]
    action: ExplainAction,
    /// The operator asking (migrate-vm only; host actions are asked by the host).
    #[arg(long)]
    operator: Option<OperatorName>,
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
    /// A tenant the VM must not share a host with (repeatable).
    #[arg(long = "anti-affinity")]
    anti_affinity: Vec<String>,
    /// Source host (not needed for start-vm).
    #[arg(long)]
    from: Option<HostName>,
    #[arg(long)]
    to: HostName,
    /// A VM already on the destination, e.g.
    /// `name=victim,tenant=red,anti-affinity=blue` (keys: name, tenant,
    /// security-level, zone, anti-affinity; the last two repeatable). Repeatable.
    #[arg(long = "resident", value_parser = parse_resident)]
    residents: Vec<Resident>,
    #[arg(long)]
    postcopy: bool,
    /// Decide as if the source's platform were not attested (attestation off there).
    #[arg(long)]
    source_unattested: bool,
    /// Decide as if the destination's platform were not attested.
    #[arg(long)]
    destination_unattested: bool,
}

/// Parses `--resident name=victim,tenant=red,anti-affinity=blue`.
fn parse_resident(spec: &str) -> Result<Resident, String> {
    let (mut name, mut labels) = (None, VmLabels::default());
    for part in spec.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not key=value (e.g. name=victim,tenant=red)"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("`{key}` has an empty value"));
        }
        match key.trim() {
            "name" => name = Some(value.parse::<VmName>().map_err(|e| format!("name: {e}"))?),
            "tenant" => labels.tenant = value.to_owned(),
            "security-level" => {
                labels.security_level = value
                    .parse()
                    .map_err(|_| format!("security-level `{value}` is not a number 0..=255"))?
            }
            "zone" => labels.allowed_zones.push(value.to_owned()),
            "anti-affinity" => labels.anti_affinity.push(value.to_owned()),
            other => {
                return Err(format!(
                    "unknown key `{other}` (expected name, tenant, security-level, zone, anti-affinity)"
                ))
            }
        }
    }
    let name = name.ok_or("a resident needs name=...")?;
    if labels.tenant.is_empty() {
        return Err(format!("resident `{name}` needs tenant=..."));
    }
    if let Some(problem) = labels.problem() {
        return Err(format!("resident `{name}`: {problem}"));
    }
    Ok(Resident { name, labels })
}

/// The request `ferry policy explain` decides.
fn explain_request(a: ExplainArgs) -> Result<Request> {
    let (principal, action, source) = match a.action {
        ExplainAction::MigrateVm => {
            let Some(name) = a.operator else {
                bail!("--action migrate-vm is asked by an operator: give --operator NAME");
            };
            (Principal::Operator { name, role: a.role }, Action::MigrateVm, a.from)
        }
        ExplainAction::SendVm => {
            let from = a.from.ok_or_else(|| anyhow!("--action send-vm needs --from"))?;
            (Principal::Host { name: from.clone() }, Action::SendVm, Some(from))
        }
        ExplainAction::ReceiveVm => {
            (Principal::Host { name: a.to.clone() }, Action::ReceiveVm, a.from)
        }
        // A start happens on one host: it is both ends.
        ExplainAction::StartVm => {
            (Principal::Host { name: a.to.clone() }, Action::StartVm, Some(a.to.clone()))
        }
    };
    let Some(source) = source else {
        let name = a.action.to_possible_value().map(|v| v.get_name().to_owned());
        bail!("--action {} needs --from", name.unwrap_or_default());
    };
    if !a.residents.is_empty() && !matches!(action, Action::ReceiveVm | Action::StartVm) {
        bail!(
            "--resident is known only where the VM is to run: use --action receive-vm or start-vm"
        );
    }
    Ok(Request {
        principal,
        action,
        vm: a.vm,
        labels: VmLabels {
            tenant: a.tenant,
            security_level: a.security_level,
            allowed_zones: a.zones,
            anti_affinity: a.anti_affinity,
        },
        source,
        destination: a.to,
        postcopy: a.postcopy,
        source_attested: !a.source_unattested,
        destination_attested: !a.destination_unattested,
        now_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        resident_on_destination: a.residents,
    })
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
        PolicyCommand::Explain(args) => {
            let engine = PolicyEngine::load(&args.files, &args.entities)?;
            let req = explain_request(*args)?;
            let decision = engine.authorize(&req);
            if json {
                let (allow, reason, residents) = match &decision {
                    ferry_policy::Decision::Allow { .. } => (true, None, Vec::new()),
                    ferry_policy::Decision::Deny { reason, residents, .. } => {
                        (false, Some(reason.clone()), residents.clone())
                    }
                };
                outln!(
                    "{}",
                    serde_json::json!({ "allow": allow, "reason": reason, "policies": decision.policies(), "residents": residents })
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: PolicyCommand,
    }

    fn request(args: &str) -> Result<Request> {
        let argv = format!("policy explain --policy p.cedar --entities e.json --vm web {args}");
        match Cli::try_parse_from(argv.split_whitespace()).map_err(|e| anyhow!("{e}"))?.cmd {
            PolicyCommand::Explain(a) => explain_request(*a),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn residents_parse_with_every_key_and_refuse_mistakes() {
        let r = parse_resident("name=victim,tenant=red,anti-affinity=blue,anti-affinity=green,zone=z1,security-level=2")
            .expect("parses");
        assert_eq!(r.name.as_str(), "victim");
        assert_eq!(r.labels.tenant, "red");
        assert_eq!(r.labels.anti_affinity, ["blue", "green"]);
        assert_eq!(r.labels.allowed_zones, ["z1"]);
        assert_eq!(r.labels.security_level, 2);
        for (bad, says) in [
            ("tenant=red", "needs name"),
            ("name=victim", "needs tenant"),
            ("name=victim,tenant=red,colour=blue", "unknown key `colour`"),
            ("name=victim,tenant=red,blue", "not key=value"),
            ("name=victim,tenant=", "empty value"),
            ("name=victim,tenant=red,security-level=9", "above the maximum"),
            ("name=victim,tenant=red,security-level=high", "not a number"),
            ("name=Not Valid,tenant=red", "name:"),
        ] {
            let e = parse_resident(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn each_action_is_asked_by_its_own_principal() {
        let r = request("--operator bob --from host1 --to host2").expect("migrate");
        assert_eq!(r.action, Action::MigrateVm);
        assert!(
            matches!(r.principal, Principal::Operator { ref name, .. } if name.as_str() == "bob")
        );
        let r = request("--action send-vm --from host1 --to host2").expect("send");
        assert!(matches!(r.principal, Principal::Host { ref name } if name.as_str() == "host1"));
        let r = request(
            "--action receive-vm --from host1 --to host2 --tenant blue --resident name=victim,tenant=red,anti-affinity=blue",
        )
        .expect("receive");
        assert!(matches!(r.principal, Principal::Host { ref name } if name.as_str() == "host2"));
        assert_eq!(r.resident_on_destination.len(), 1);
        let r = request("--action start-vm --to host2 --anti-affinity red").expect("start");
        assert_eq!((r.action, r.source.as_str()), (Action::StartVm, "host2"));
        assert_eq!(r.labels.anti_affinity, ["red"]);
    }

    #[test]
    fn missing_or_misplaced_arguments_are_named() {
        let e = request("--from host1 --to host2").expect_err("no operator").to_string();
        assert!(e.contains("--operator"), "{e}");
        let e = request("--action receive-vm --to host2").expect_err("no source").to_string();
        assert!(e.contains("--action receive-vm needs --from"), "{e}");
        let e = request("--operator bob --from host1 --to host2 --resident name=v,tenant=t")
            .expect_err("residents on the source")
            .to_string();
        assert!(e.contains("--resident"), "{e}");
    }
}
