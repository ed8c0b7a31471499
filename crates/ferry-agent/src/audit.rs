//! What this host writes to its audit log, one variant per kind, with its
//! details typed. Which records a step cannot do without (fail closed:
//! no record, no step) is decided here, in [`Audit::mandatory`], not at each
//! call site.

use ferry_types::Digest32;
use serde_json::{json, Value};

use crate::attestation::AttestationOutcome;
use ferry_session::{MigrationState, Outcome};

/// Which Commit or Receipt of a migration a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The only one (pre-copy).
    Whole,
    /// Post-copy: the stream up to the switchover.
    Switchover,
    /// Post-copy: the whole stream, after the last page.
    Final,
}

impl Phase {
    fn detail(self) -> Value {
        match self {
            Phase::Whole => Value::Null,
            Phase::Switchover => json!({ "postcopy": "switchover" }),
            Phase::Final => json!({ "postcopy": "final" }),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Audit {
    /// Source: policy or a limit refused an operator's request.
    Denied {
        operator: String,
        role: String,
        reason: String,
    },
    /// Policy refused starting a VM on this host (co-location).
    StartDenied {
        vm: String,
        operator: String,
        role: String,
        reason: String,
    },
    OfferSent {
        operator: String,
        attestation: Option<AttestationOutcome>,
    },
    OfferReceived {
        attestation: Option<AttestationOutcome>,
    },
    AcceptSent,
    AcceptReceived,
    /// Source: the destination refused the offer.
    RefusedByPeer {
        reason: String,
    },
    AttestationRefused {
        peer: String,
        why: String,
    },
    CommitSent(Phase),
    CommitReceived(Phase),
    ReceiptSent(Phase),
    ReceiptReceived {
        phase: Phase,
        via: Option<&'static str>,
    },
    AbortSent {
        reason: String,
    },
    AbortReceived {
        reason: String,
    },
    /// Destination: about to resume the VM; counts and digest matched.
    Resuming {
        bytes: u64,
        digest: Digest32,
        postcopy: bool,
    },
    FinalReceiptMissing {
        why: String,
    },
    PostcopyRecoverSent,
    PostcopyRecoverReceived,
    PostcopyRecoverFailed {
        error: String,
    },
    /// Source: one attempt to settle an in-doubt migration.
    ResolveAttempt {
        attempt: u64,
        result: String,
    },
    /// Source: told the destination that the source half is lost.
    PostcopyLostSent,
    PostcopyLostReceived,
    /// A migration reached an outcome (from the transition table).
    Outcome {
        outcome: Outcome,
        state: MigrationState,
        reason: Option<String>,
        bytes: u64,
    },
    PolicyReloaded {
        policies: usize,
    },
    PolicyReloadRefused {
        error: String,
    },
    /// Source: the destination announced it cannot host the VM's vTPM;
    /// nothing was offered.
    VtpmPreflightFailed {
        peer: String,
        why: String,
    },
    /// Source, after the Receipt: the VM's vTPM state here was erased.
    VtpmErased {
        files: u64,
        bytes: u64,
    },
    /// At start-up: vTPM state that must not be used was not adopted.
    VtpmRefused {
        vm: String,
        dir: String,
        migration: Option<String>,
        why: String,
    },
    /// Source (libvirt): a process other than libvirt's daemon or the
    /// domain's QEMU connected to a migration's local socket.
    LocalConnectionRefused {
        migration: String,
        vm: String,
        why: String,
    },
    /// Destination (libvirt): a call on libvirt's control connection that
    /// the allowlist refused; the connection was cut.
    ControlCallRefused {
        migration: String,
        vm: String,
        why: String,
    },
}

impl Audit {
    /// The record's kind, as third-party verifiers read it.
    pub fn kind(&self) -> &'static str {
        match self {
            Audit::Denied { .. } => "denied",
            Audit::StartDenied { .. } => "start_denied",
            Audit::OfferSent { .. } => "offer_sent",
            Audit::OfferReceived { .. } => "offer_received",
            Audit::AcceptSent => "accept_sent",
            Audit::AcceptReceived => "accept_received",
            Audit::RefusedByPeer { .. } => "refused_by_peer",
            Audit::AttestationRefused { .. } => "attestation_refused",
            Audit::CommitSent(_) => "commit_sent",
            Audit::CommitReceived(_) => "commit_received",
            Audit::ReceiptSent(_) => "receipt_sent",
            Audit::ReceiptReceived { .. } => "receipt_received",
            Audit::AbortSent { .. } => "abort_sent",
            Audit::AbortReceived { .. } => "abort_received",
            Audit::Resuming { .. } => "resuming",
            Audit::FinalReceiptMissing { .. } => "final_receipt_missing",
            Audit::PostcopyRecoverSent => "postcopy_recover_sent",
            Audit::PostcopyRecoverReceived => "postcopy_recover_received",
            Audit::PostcopyRecoverFailed { .. } => "postcopy_recover_failed",
            Audit::ResolveAttempt { .. } => "resolve_attempt",
            Audit::PostcopyLostSent => "postcopy_lost_sent",
            Audit::PostcopyLostReceived => "postcopy_lost_received",
            Audit::Outcome { outcome, .. } => match outcome {
                Outcome::Completed => "completed",
                Outcome::RolledBack => "rolled_back",
                Outcome::Refused => "refused",
                Outcome::Discarded => "discarded",
                Outcome::InDoubt => "in_doubt",
                Outcome::PostcopyInterrupted => "postcopy_interrupted",
                Outcome::PostcopyLost => "postcopy_lost",
            },
            Audit::PolicyReloaded { .. } => "policy_reloaded",
            Audit::PolicyReloadRefused { .. } => "policy_reload_refused",
            Audit::VtpmPreflightFailed { .. } => "vtpm_preflight_failed",
            Audit::VtpmErased { .. } => "vtpm_erased",
            Audit::VtpmRefused { .. } => "vtpm_refused",
            Audit::LocalConnectionRefused { .. } => "local_connection_refused",
            Audit::ControlCallRefused { .. } => "control_call_refused",
        }
    }

    /// SECURITY (R6): a host logs what it signs before sending it, and what
    /// it receives before acting on it; a step whose record cannot be
    /// written does not happen. These are the records such steps depend
    /// on. The rest report what already happened (the VM already runs on
    /// the destination, the source already rolled back): a failed write is
    /// logged, and refusing the step would protect nothing.
    pub fn mandatory(&self) -> bool {
        matches!(
            self,
            Audit::OfferSent { .. }
                | Audit::OfferReceived { .. }
                | Audit::AcceptSent
                | Audit::AcceptReceived
                | Audit::CommitSent(Phase::Whole | Phase::Switchover)
                | Audit::CommitReceived(Phase::Whole | Phase::Switchover)
                | Audit::Resuming { .. }
        )
    }

    pub fn detail(&self) -> Value {
        match self {
            Audit::Denied { operator, role, reason } => {
                json!({ "operator": operator, "role": role, "reason": reason })
            }
            Audit::StartDenied { vm, operator, role, reason } => {
                json!({ "vm": vm, "operator": operator, "role": role, "reason": reason })
            }
            Audit::OfferSent { operator, attestation } => {
                json!({ "operator": operator, "attestation": attestation })
            }
            Audit::OfferReceived { attestation } => json!({ "attestation": attestation }),
            Audit::AcceptSent
            | Audit::AcceptReceived
            | Audit::PostcopyRecoverSent
            | Audit::PostcopyRecoverReceived
            | Audit::PostcopyLostSent
            | Audit::PostcopyLostReceived => Value::Null,
            Audit::RefusedByPeer { reason }
            | Audit::AbortSent { reason }
            | Audit::AbortReceived { reason } => json!({ "reason": reason }),
            Audit::AttestationRefused { peer, why } => json!({ "peer": peer, "why": why }),
            Audit::CommitSent(p) | Audit::CommitReceived(p) | Audit::ReceiptSent(p) => p.detail(),
            Audit::ReceiptReceived { phase, via } => {
                let mut d = phase.detail();
                if let Some(via) = via {
                    d = merge(d, json!({ "via": via }));
                }
                d
            }
            Audit::Resuming { bytes, digest, postcopy } => {
                let d = json!({ "bytes": bytes, "digest": digest });
                if *postcopy {
                    merge(d, json!({ "postcopy": true }))
                } else {
                    d
                }
            }
            Audit::FinalReceiptMissing { why } => json!({ "why": why }),
            Audit::PostcopyRecoverFailed { error } => json!({ "error": error }),
            Audit::ResolveAttempt { attempt, result } => {
                json!({ "attempt": attempt, "result": result })
            }
            Audit::Outcome { state, reason, bytes, .. } => {
                json!({ "state": state, "error": reason, "bytes": bytes })
            }
            Audit::PolicyReloaded { policies } => json!({ "policies": policies }),
            Audit::PolicyReloadRefused { error } => json!({ "error": error }),
            Audit::VtpmPreflightFailed { peer, why } => json!({ "peer": peer, "why": why }),
            Audit::VtpmErased { files, bytes } => json!({ "files": files, "bytes": bytes }),
            Audit::VtpmRefused { vm, dir, migration, why } => {
                json!({ "vm": vm, "dir": dir, "migration": migration, "why": why })
            }
            Audit::LocalConnectionRefused { migration, vm, why }
            | Audit::ControlCallRefused { migration, vm, why } => {
                json!({ "migration": migration, "vm": vm, "why": why })
            }
        }
    }
}

fn merge(a: Value, b: Value) -> Value {
    match (a, b) {
        (Value::Object(mut a), Value::Object(b)) => {
            a.extend(b);
            Value::Object(a)
        }
        (Value::Null, b) => b,
        (a, _) => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records the protocol's steps wait for, and only those.
    #[test]
    fn exactly_the_records_a_step_depends_on_are_mandatory() {
        let mandatory = [
            Audit::OfferSent { operator: "a".into(), attestation: None },
            Audit::OfferReceived { attestation: None },
            Audit::AcceptSent,
            Audit::AcceptReceived,
            Audit::CommitSent(Phase::Whole),
            Audit::CommitSent(Phase::Switchover),
            Audit::CommitReceived(Phase::Whole),
            Audit::CommitReceived(Phase::Switchover),
            Audit::Resuming { bytes: 1, digest: Digest32([0; 32]), postcopy: false },
        ];
        for a in &mandatory {
            assert!(a.mandatory(), "{}", a.kind());
        }
        let reports = [
            Audit::ReceiptSent(Phase::Whole),
            Audit::ReceiptReceived { phase: Phase::Whole, via: None },
            Audit::CommitSent(Phase::Final),
            Audit::AbortSent { reason: "x".into() },
            Audit::AbortReceived { reason: "x".into() },
            Audit::Outcome {
                outcome: Outcome::RolledBack,
                state: MigrationState::Aborted,
                reason: None,
                bytes: 0,
            },
            Audit::ResolveAttempt { attempt: 1, result: "unreachable".into() },
        ];
        for a in &reports {
            assert!(!a.mandatory(), "{}", a.kind());
        }
    }

    #[test]
    fn kinds_are_what_verifiers_read() {
        assert_eq!(Audit::CommitSent(Phase::Switchover).kind(), "commit_sent");
        assert_eq!(
            Audit::CommitSent(Phase::Switchover).detail(),
            json!({ "postcopy": "switchover" })
        );
        let r = Audit::ReceiptReceived { phase: Phase::Final, via: Some("resolve") };
        assert_eq!(r.detail(), json!({ "postcopy": "final", "via": "resolve" }));
        for kind in [Audit::PostcopyLostReceived.kind(), "postcopy_interrupted"] {
            assert!(kind.len() <= 32 && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }
}
