//! `ferry policy explain`: a decision, the request as policy saw it, and
//! every policy (and resident VM) that mattered, as text for people.

use std::fmt::Write as _;

use cedar_policy::{EntityId, EntityUid};

use super::{effect_of, PolicyEngine};
use crate::types::{Decision, Principal, Request, Resident, VmLabels};

/// Residents listed one per line; more are summarised, so a host with
/// hundreds of VMs still gives a readable answer.
const RESIDENTS_LISTED: usize = 20;

pub(super) fn who(p: &Principal) -> String {
    match p {
        Principal::Operator { name, role } => format!("operator `{name}` acting as `{role}`"),
        Principal::Host { name } => format!("host `{name}`"),
    }
}

pub(super) fn describe_labels(l: &VmLabels) -> String {
    format!(
        "tenant `{}`, security level {}, allowed zones [{}], anti-affinity [{}]",
        l.tenant,
        l.security_level,
        l.allowed_zones.join(", "),
        l.anti_affinity.join(", ")
    )
}

/// One resident, briefly: what a co-location rule can have looked at.
pub(super) fn describe_resident(r: &Resident) -> String {
    let l = &r.labels;
    format!("`{}` (tenant `{}`, anti-affinity [{}])", r.name, l.tenant, l.anti_affinity.join(", "))
}

impl PolicyEngine {
    /// The decision, the request as policy saw it, and every policy that
    /// mattered, as text for `ferry policy explain`.
    pub fn explain(&self, req: &Request) -> String {
        let outcome = self.evaluate(req);
        let mut out = String::new();
        // Writing to a String cannot fail; the results are ignored on purpose.
        let _ = writeln!(
            out,
            "decision: {}",
            if outcome.decision.is_allow() { "ALLOW" } else { "DENY" }
        );
        let _ = writeln!(
            out,
            "request:  {} {} VM `{}` from `{}` to `{}`{}",
            who(&req.principal),
            req.action,
            req.vm,
            req.source,
            req.destination,
            if req.postcopy { " (post-copy)" } else { "" }
        );
        let _ = writeln!(out, "labels:   {}", describe_labels(&req.labels));
        for (role, host) in [("source", &req.source), ("destination", &req.destination)] {
            let _ = writeln!(out, "{:<10}{}", format!("{role}: "), self.describe_host(host));
        }
        let residents = &req.resident_on_destination;
        if !residents.is_empty() {
            let _ = writeln!(out, "resident: {} VM(s) on the destination", residents.len());
            for r in residents.iter().take(RESIDENTS_LISTED) {
                let _ = writeln!(out, "  `{}`: {}", r.name, describe_labels(&r.labels));
            }
            if residents.len() > RESIDENTS_LISTED {
                let _ = writeln!(out, "  ... and {} more", residents.len() - RESIDENTS_LISTED);
            }
        }
        if let Decision::Deny { reason, .. } = &outcome.decision {
            let _ = writeln!(out, "reason:   {reason}");
        }
        let decided = outcome.decision.policies();
        if !decided.is_empty() {
            let _ = writeln!(out, "decided by:");
            for id in decided {
                let _ = writeln!(out, "  {}", self.describe_policy(id));
            }
        }
        if let Decision::Deny { residents: blocking, .. } = &outcome.decision {
            if !blocking.is_empty() {
                let _ = writeln!(out, "blocked by resident(s):");
                for r in residents.iter().filter(|r| blocking.contains(&r.name)) {
                    let _ = writeln!(out, "  `{}`: {}", r.name, describe_labels(&r.labels));
                }
            }
        }
        if !outcome.decision.is_allow() && decided.is_empty() {
            let candidates = self.permits_for(req.action);
            if !candidates.is_empty() {
                let _ = writeln!(out, "permit policies for {} (none matched):", req.action);
                for id in candidates {
                    let _ = writeln!(out, "  {}", self.describe_policy(&id));
                }
            }
        }
        for e in &outcome.errors {
            let _ = writeln!(out, "error:    {e}");
        }
        out
    }

    fn describe_host(&self, host: &ferry_types::HostName) -> String {
        let uid =
            EntityUid::from_type_name_and_id(self.names.host.clone(), EntityId::new(host.as_str()));
        match self.entities.get(&uid) {
            None => format!("`{host}`: not in the entities file"),
            Some(e) => {
                let attr = |k: &str| match e.attr(k) {
                    Some(Ok(v)) => v.to_string(),
                    _ => "?".to_owned(),
                };
                format!("`{host}`: zone {}, trust level {}", attr("zone"), attr("trust_level"))
            }
        }
    }

    fn describe_policy(&self, id: &str) -> String {
        match self.meta.get(id) {
            Some(m) => format!(
                "{} {id} ({}){}",
                effect_of(m.effect),
                m.file.display(),
                m.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
            ),
            None => id.to_owned(),
        }
    }
}
