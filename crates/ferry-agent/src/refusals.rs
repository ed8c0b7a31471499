//! Refusals a backend made on its own mid-migration (a local process on a
//! migration's socket, a call on libvirt's control connection), audited and
//! counted like every other refusal.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::audit::Audit;
use crate::backend::libvirt::{Refusal, RefusalKind};

/// The metric reason and the audit record of a refusal.
pub fn judged(r: Refusal) -> (&'static str, Audit) {
    let (migration, vm, why) = (r.migration.to_string(), r.vm.to_string(), r.why);
    match r.kind {
        RefusalKind::LocalConnection => {
            ("local_connection", Audit::LocalConnectionRefused { migration, vm, why })
        }
        RefusalKind::ControlCall => {
            ("control_call", Audit::ControlCallRefused { migration, vm, why })
        }
    }
}

pub fn spawn(agent: Arc<Agent>, mut rx: mpsc::UnboundedReceiver<Refusal>) {
    tokio::spawn(async move {
        while let Some(refusal) = rx.recv().await {
            let (reason, audit) = judged(refusal);
            agent.metrics.refused(reason);
            // Not mandatory: the refusal already happened; a failed write is logged.
            let _ = agent.notary.record(audit, None, None).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_refusal_has_its_own_reason_and_audit_kind() {
        let r = |kind| Refusal {
            migration: ferry_types::MigrationId::new(),
            vm: "lv".parse().expect("vm"),
            kind,
            why: "pid 7 (uid 1000, /usr/bin/socat)".into(),
        };
        let (reason, audit) = judged(r(RefusalKind::LocalConnection));
        assert_eq!((reason, audit.kind()), ("local_connection", "local_connection_refused"));
        assert_eq!(audit.detail()["why"], "pid 7 (uid 1000, /usr/bin/socat)");
        let (reason, audit) = judged(r(RefusalKind::ControlCall));
        assert_eq!((reason, audit.kind()), ("control_call", "control_call_refused"));
        assert_eq!(audit.detail()["vm"], "lv");
    }
}
