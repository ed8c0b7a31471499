//! Which resident VMs made a forbid match: a co-location refusal names the
//! VM it protects (or that excludes the mover), not only the rule.
//!
//! Cedar reports which policies matched, not which set element made them
//! match, so the engine asks again: once with no residents (policies that
//! match anyway are not about residents) and once per resident alone. This
//! holds for any policy an operator writes, not only the shipped ones.

use ferry_types::VmName;

use super::explain::describe_resident;
use super::PolicyEngine;
use crate::types::Request;

/// Residents named in one reason; the decision itself lists them all.
const NAMED_IN_REASON: usize = 5;

/// How a matched forbid depends on the residents.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Blame {
    /// It matches with no residents at all.
    NotResidents,
    /// Each of these residents (indices) makes it match on its own.
    Residents(Vec<usize>),
    /// It needs several residents at once (e.g. a count); none alone.
    Together,
}

impl PolicyEngine {
    /// Forbid ids that match `req` with these residents, or `None` when
    /// the request cannot be decided (then nothing is attributed).
    fn forbids_with(&self, req: &Request, residents: &[crate::Resident]) -> Option<Vec<String>> {
        let probe = Request { resident_on_destination: residents.to_vec(), ..req.clone() };
        let verdict = self.run(&probe).ok()?;
        if !verdict.errors.is_empty() {
            return None;
        }
        Some(if verdict.allowed { Vec::new() } else { verdict.matched })
    }

    /// For each forbid in `matched` (which matched `req`), how it depends on
    /// the residents. Costs one evaluation plus one per resident, and runs
    /// only for a denial that has residents.
    pub(super) fn blame(&self, req: &Request, matched: &[String]) -> Vec<Blame> {
        let residents = &req.resident_on_destination;
        let baseline = if residents.is_empty() { None } else { self.forbids_with(req, &[]) };
        let Some(baseline) = baseline else {
            return matched.iter().map(|_| Blame::NotResidents).collect();
        };
        let mut blame: Vec<Blame> = matched
            .iter()
            .map(|id| {
                if baseline.contains(id) {
                    Blame::NotResidents
                } else {
                    Blame::Residents(Vec::new())
                }
            })
            .collect();
        if blame.iter().all(|b| *b == Blame::NotResidents) {
            return blame;
        }
        for (i, r) in residents.iter().enumerate() {
            let Some(alone) = self.forbids_with(req, std::slice::from_ref(r)) else { continue };
            for (id, b) in matched.iter().zip(blame.iter_mut()) {
                if let Blame::Residents(who) = b {
                    if alone.contains(id) {
                        who.push(i);
                    }
                }
            }
        }
        for b in &mut blame {
            if matches!(b, Blame::Residents(who) if who.is_empty()) {
                *b = Blame::Together;
            }
        }
        blame
    }
}

/// The clause appended to a forbid's reason naming the residents it is about.
pub(super) fn blame_clause(req: &Request, blame: &Blame) -> Option<String> {
    match blame {
        Blame::NotResidents => None,
        Blame::Together => Some("because of the destination's residents together".to_owned()),
        Blame::Residents(who) => {
            let named: Vec<String> = who
                .iter()
                .take(NAMED_IN_REASON)
                .map(|&i| describe_resident(&req.resident_on_destination[i]))
                .collect();
            let more = who.len().saturating_sub(NAMED_IN_REASON);
            let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
            let noun = if who.len() == 1 { "resident VM" } else { "resident VMs" };
            Some(format!("{noun} {}{tail}", named.join(", ")))
        }
    }
}

/// Names of every resident blamed, in resident order, each once.
pub(super) fn blamed_names(req: &Request, blame: &[Blame]) -> Vec<VmName> {
    let residents = &req.resident_on_destination;
    (0..residents.len())
        .filter(|i| blame.iter().any(|b| matches!(b, Blame::Residents(who) if who.contains(i))))
        .map(|i| residents[i].name.clone())
        .collect()
}
