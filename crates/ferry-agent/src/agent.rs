//! The agent: one per hypervisor host, and everything its migrations share.

use ferry_identity::TlsConfigs;
use ferry_session::Effect;
use ferry_types::{HostName, MigrationId, TrustDomain};
use tokio::sync::mpsc;

use crate::attestation::Attestation;
use crate::audit::Audit;
use crate::authz::Authz;
use crate::backend::VmBackend;
use crate::config::AgentConfig;
use crate::error::Error;
use crate::inflight::Registry;
use crate::metrics::Metrics;
use crate::notary::Notary;
use crate::records::RecordStore;

pub struct Agent {
    pub cfg: AgentConfig,
    pub host: HostName,
    pub domain: TrustDomain,
    pub tls: TlsConfigs,
    /// Who runs this host's VMs.
    pub backend: Box<dyn VmBackend>,
    pub records: RecordStore,
    /// This host's signature and audit log.
    pub notary: Notary,
    pub attestation: Attestation,
    pub authz: Authz,
    pub metrics: Metrics,
    /// Migrations in flight: progress, cancels, joining streams, loops.
    pub sessions: Registry,
    /// Held while an incoming offer is decided, so admission sees a stable
    /// picture of what runs and what is reserved here.
    pub admission_lock: tokio::sync::Mutex<()>,
    pub(crate) follow_ups: mpsc::UnboundedSender<(MigrationId, Effect)>,
    /// Set when the agent shuts down: its loops stop at their next turn.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl Agent {
    /// Hand a loop-starting effect (resolve, recover, notify) to the
    /// supervisor, which runs at most one loop of each kind per migration.
    pub fn follow_up(&self, id: MigrationId, effect: Effect) {
        if self.follow_ups.send((id, effect)).is_err() {
            tracing::error!(%id, ?effect, "the supervisor is gone; the loop does not start");
        }
    }

    /// Stop starting work: the supervisor's loops end at their next turn
    /// (the process is about to exit, or a test replaces this agent).
    pub fn stop(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn stopped(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Reload the policy files atomically (SIGHUP or the API). The outcome is
    /// audited; on error the old policy stays in force.
    pub async fn reload_policy(&self) -> Result<usize, Error> {
        let result = self.authz.reload();
        let audit = match &result {
            Ok(n) => Audit::PolicyReloaded { policies: *n },
            Err(e) => Audit::PolicyReloadRefused { error: crate::report::report(e) },
        };
        let _ = self.notary.record(audit, None, None).await;
        match result {
            Ok(n) => {
                tracing::info!(policies = n, "policy reloaded");
                Ok(n)
            }
            Err(e) => {
                let why = crate::report::report(&e);
                tracing::warn!(error = %why, "policy reload refused; the old policy stays in force");
                Err(Error::PolicyReload(why))
            }
        }
    }
}
