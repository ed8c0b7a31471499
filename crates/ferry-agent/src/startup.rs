//! Starting an agent: load its identity and state, adopt the VMs that
//! survived, settle interrupted migrations, start the supervisor. Tests
//! assemble agents from other parts (a fake backend, a fake platform) with
//! [`Agent::assemble`].

use std::sync::Arc;

use ferry_identity::{Identity, TlsConfigs};
use ferry_types::HostName;
use ferry_vmm::QemuConfig;
use tokio::sync::mpsc;

use crate::agent::Agent;
use crate::attestation::{Attestation, Platform, Tpm};
use crate::authz::Authz;
use crate::backend::libvirt::{LibvirtBackend, LibvirtConfig, Refusals};
use crate::backend::qemu::QemuBackend;
use crate::backend::{BackendError, VmBackend};
use crate::config::{AgentConfig, BackendChoice, ConfigError};
use crate::inflight::Registry;
use crate::metrics::Metrics;
use crate::notary::Notary;
use crate::records::{RecordError, RecordStore};
use crate::session::{restart, supervisor};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightFailed),
    #[error("TLS identity")]
    Identity(#[from] ferry_identity::IdentityError),
    #[error("certificate {cert:?} is for {actual}, but the config names this host {expected}")]
    IdentityMismatch { cert: std::path::PathBuf, expected: HostName, actual: String },
    #[error("migration records")]
    Records(#[from] RecordError),
    #[error("audit log")]
    Audit(#[from] ferry_audit::AuditError),
    #[error("creating {0}")]
    StateDir(std::path::PathBuf, #[source] std::io::Error),
    #[error("policy")]
    Policy(#[from] ferry_policy::PolicyError),
    #[error("VM backend")]
    Backend(#[from] BackendError),
    #[error("settling interrupted migrations")]
    Restart(#[source] Box<crate::error::Error>),
}

/// What an agent is made of besides its config.
pub struct Parts {
    pub cfg: AgentConfig,
    pub tls: TlsConfigs,
    pub backend: Box<dyn VmBackend>,
    /// None: attestation (insecurely) disabled.
    pub platform: Option<Box<dyn Platform>>,
    pub notary: Notary,
}

impl Agent {
    /// The production agent: QEMU backend, the host's TPM, files from
    /// `cfg`, checked against the host first (preflight).
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, StartError> {
        // Before anything is touched: a failed check leaves state as it was.
        crate::preflight::enforce(&crate::preflight::run(&cfg).await)?;
        let identity =
            Identity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca, cfg.tls.crl.as_deref())?;
        match identity.spiffe() {
            ferry_types::SpiffeId::Host { name, .. } if *name == cfg.host.name => {}
            other => {
                return Err(StartError::IdentityMismatch {
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
            swtpm: cfg.qemu.swtpm.clone(),
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
        let (refusals, refused) = Refusals::new();
        let backend: Box<dyn VmBackend> = match cfg.vmm.backend {
            BackendChoice::Qemu => {
                Box::new(QemuBackend::new(qemu, cfg.departed_dir())?.probe_vtpm().await)
            }
            BackendChoice::Libvirt => Box::new(
                LibvirtBackend::new(LibvirtConfig {
                    uri: cfg.vmm.libvirt_uri.clone(),
                    run_dir: cfg.vmm.libvirt_run_dir.clone(),
                    socket_dir: cfg.vmm.migration_socket_dir.clone(),
                    resume_wait: cfg.migration.commit_timeout(),
                    swtpm_state_root: cfg.vmm.libvirt_swtpm_dir.clone(),
                    refusals,
                })?
                .probe_vtpm(&cfg.qemu.swtpm, &cfg.qemu.binary)
                .await,
            ),
        };
        // The config was checked when parsed; this cannot fail here.
        let platform = cfg
            .attestation
            .paths(std::path::Path::new("config"))?
            .map(|p| Box::new(Tpm::new(cfg.host.name.clone(), p)) as Box<dyn Platform>);
        let signer = ferry_audit::Signer::load(&cfg.tls.cert, &cfg.tls.key)?;
        let audit_path = cfg.audit_log_path();
        if let Some(dir) = audit_path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StartError::StateDir(dir.to_owned(), e))?;
        }
        let log = ferry_audit::AuditLog::open(&audit_path, signer)?;
        let ca = ferry_audit::CaTrust::load(&cfg.tls.ca)?;
        let notary = Notary::new(domain, log, ca);
        let agent = Agent::assemble(Parts { cfg, tls, backend, platform, notary }).await?;
        crate::refusals::spawn(agent.clone(), refused);
        Ok(agent)
    }

    /// Put an agent together, adopt its VMs and settle what a restart left.
    pub async fn assemble(parts: Parts) -> Result<Arc<Agent>, StartError> {
        let Parts { cfg, tls, backend, platform, notary } = parts;
        let records = RecordStore::open(&cfg.records_dir())?;
        let authz = Authz::load(&cfg)?;
        // Security limits a restart (or a provoked crash) must not reset.
        authz.restore(&records)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let agent = Arc::new(Agent {
            host: cfg.host.name.clone(),
            domain: tls.identity().domain().clone(),
            tls,
            backend,
            records,
            notary,
            attestation: Attestation::new(platform),
            authz,
            metrics: Metrics::default(),
            sessions: Registry::default(),
            admission_lock: tokio::sync::Mutex::new(()),
            follow_ups: tx,
            stopping: Default::default(),
            cfg,
        });
        supervisor::spawn(agent.clone(), rx);
        restart::recover(&agent).await.map_err(|e| StartError::Restart(Box::new(e)))?;
        Ok(agent)
    }
}
