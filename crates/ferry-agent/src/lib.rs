//! The Ferry agent: one per hypervisor host. It serves the operator API and
//! the peer migration protocol on one mTLS listener, runs the migration
//! state machine on both sides, and keeps durable records of every
//! migration so that a restart never leaves a VM running twice or lost.
//!
//! * [`server`]: accept, TLS, and dispatch by the peer's certified identity.
//! * [`api`]: operator requests.
//! * [`outgoing`] / [`incoming`]: the source and destination halves of a migration.
//! * [`recovery`]: reconciling VMs and records after a restart.

pub mod api;
pub mod attestation;
pub mod authz;
pub mod client;
pub mod config;
pub mod evidence;
pub mod incoming;
pub mod metrics;
pub mod outgoing;
pub mod postcopy;
pub mod protocol;
pub mod records;
pub mod recover;
pub mod recovery;
pub mod resolve;
pub mod server;
pub mod streams;
pub mod vms;

use std::collections::HashMap;
use std::sync::Arc;

use ferry_identity::{Identity, TlsConfigs};
use ferry_types::{HostName, MigrationId, TrustDomain};
use ferry_vmm::{Accel, QemuConfig};
use tokio::sync::{watch, Mutex};

pub use config::AgentConfig;
pub use protocol::{ApiRequest, ApiResponse, ErrorKind};
pub use records::{MigrationRecord, MigrationState, Role};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("TLS identity")]
    Identity(#[from] ferry_identity::IdentityError),
    #[error("certificate {cert:?} is for {actual}, but the config names this host {expected}")]
    IdentityMismatch { cert: std::path::PathBuf, expected: HostName, actual: String },
    #[error("migration records")]
    Records(#[from] records::RecordError),
    #[error("audit log")]
    Audit(#[from] ferry_audit::AuditError),
    #[error("policy")]
    Policy(#[from] ferry_policy::PolicyError),
    #[error("QEMU")]
    Vmm(#[from] ferry_vmm::VmmError),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A failure reported to an operator or a peer: who is at fault, and what
/// happened, in one line.
#[derive(Debug, Clone)]
pub struct Fault {
    pub kind: ErrorKind,
    pub message: String,
}

impl Fault {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Render an error with its whole source chain, once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub host: HostName,
    pub domain: TrustDomain,
    pub tls: TlsConfigs,
    pub qemu: QemuConfig,
    pub accel: Accel,
    pub vms: vms::VmTable,
    pub records: records::RecordStore,
    /// Progress of migrations this host is sending, for operators watching.
    pub active: Mutex<HashMap<MigrationId, watch::Receiver<protocol::Progress>>>,
    /// Cancel switches of outgoing migrations that have not committed yet.
    pub cancels: Mutex<HashMap<MigrationId, watch::Sender<bool>>>,
    /// Names of incoming VMs whose QEMU is being launched (not yet in `vms`).
    incoming_names: std::sync::Mutex<std::collections::HashSet<ferry_types::VmName>>,
    /// Incoming migrations waiting for their extra data streams.
    pub joins: std::sync::Mutex<HashMap<MigrationId, streams::JoinSlot>>,
    pub metrics: metrics::Metrics,
    pub attestation: attestation::Attestation,
    /// This host's signed, hash-chained audit log (its signer is the host key).
    pub audit: Arc<std::sync::Mutex<ferry_audit::AuditLog>>,
    /// The cluster CA, to verify peers' signed messages.
    pub ca_trust: ferry_audit::CaTrust,
    pub authz: authz::Authz,
}

impl Agent {
    /// Claim a VM name for an incoming migration; false if another claimed it.
    pub fn reserve_incoming_name(&self, vm: &ferry_types::VmName) -> bool {
        match self.incoming_names.lock() {
            Ok(mut s) => s.insert(vm.clone()),
            Err(_) => false,
        }
    }

    pub fn release_incoming_name(&self, vm: &ferry_types::VmName) {
        if let Ok(mut s) = self.incoming_names.lock() {
            s.remove(vm);
        }
    }

    /// Reload the policy files atomically (SIGHUP or the API). The outcome is
    /// audited; on error the old policy stays in force.
    pub async fn reload_policy(&self) -> Result<usize, Fault> {
        let result = self.authz.reload();
        let detail = match &result {
            Ok(n) => serde_json::json!({ "policies": n }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        let mut ev = ferry_audit::AuditEvent::new(if result.is_ok() {
            "policy_reloaded"
        } else {
            "policy_reload_refused"
        });
        ev.detail = detail;
        if let Err(e) = self.audit(ev).await {
            tracing::error!(error = %e, "policy reload not in the audit log");
        }
        match result {
            Ok(n) => {
                tracing::info!(policies = n, "policy reloaded");
                Ok(n)
            }
            Err(e) => {
                tracing::warn!(error = %e, "policy reload refused; the old policy stays in force");
                Err(Fault::new(
                    ErrorKind::Request,
                    format!("policy reload refused, the old policy stays in force: {e}"),
                ))
            }
        }
    }

    /// Load identity and state, adopt surviving VMs and settle interrupted
    /// migrations. The returned agent is ready to serve.
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        let identity =
            Identity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca, cfg.tls.crl.as_deref())?;
        match identity.spiffe() {
            ferry_types::SpiffeId::Host { name, .. } if *name == cfg.host.name => {}
            other => {
                return Err(AgentError::IdentityMismatch {
                    cert: cfg.tls.cert.clone(),
                    expected: cfg.host.name.clone(),
                    actual: other.to_string(),
                })
            }
        }
        let domain = identity.domain().clone();
        let ciphers = ferry_identity::CipherPolicy::from_names(&cfg.tls.cipher_suites)?;
        let tls = TlsConfigs::with_ciphers(identity, ciphers)?;
        let qemu = QemuConfig {
            binary: cfg.qemu.binary.clone(),
            accel: cfg.qemu.accel,
            images_dir: cfg.qemu.images_dir.clone(),
            run_dir: cfg.vms_dir(),
            max_bandwidth_bytes_per_s: match cfg.qemu.max_bandwidth_mib_s {
                // QEMU needs some cap; 0 in our config means "no practical limit".
                0 => 64 << 30,
                mib => mib << 20,
            },
            downtime_limit_ms: cfg.qemu.downtime_limit_ms,
        };
        let accel = ferry_vmm::resolve_accel(qemu.accel)?;
        std::fs::create_dir_all(cfg.vms_dir()).map_err(|source| ferry_vmm::VmmError::Io {
            what: format!("creating {}", cfg.vms_dir().display()),
            source,
        })?;
        let records = records::RecordStore::open(&cfg.records_dir())?;
        // The config was checked when parsed; this cannot fail here.
        let attest_paths = cfg.attestation.paths(std::path::Path::new("config"))?;
        let signer = ferry_audit::Signer::load(&cfg.tls.cert, &cfg.tls.key)?;
        let audit_path = cfg.audit_log_path();
        if let Some(dir) = audit_path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| ferry_vmm::VmmError::Io {
                what: format!("creating {}", dir.display()),
                source,
            })?;
        }
        let audit = ferry_audit::AuditLog::open(&audit_path, signer)?;
        let ca_trust = ferry_audit::CaTrust::load(&cfg.tls.ca)?;
        let authz = authz::Authz::load(&cfg)?;
        let agent = Arc::new(Agent {
            host: cfg.host.name.clone(),
            domain,
            tls,
            qemu,
            accel,
            vms: Mutex::new(Default::default()),
            records,
            active: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            incoming_names: std::sync::Mutex::new(Default::default()),
            joins: std::sync::Mutex::new(HashMap::new()),
            metrics: metrics::Metrics::default(),
            attestation: attestation::Attestation::new(cfg.host.name.clone(), attest_paths),
            audit: Arc::new(std::sync::Mutex::new(audit)),
            ca_trust,
            authz,
            cfg,
        });
        recovery::recover(&agent).await?;
        Ok(agent)
    }
}
