//! This host's signature and its audit log (R5, R6): signing the messages
//! it sends, checking the ones peers sign, and appending what happened to
//! the hash-chained log. The one place that touches the host key.

use std::sync::{Arc, Mutex};

use ferry_audit::{AuditError, AuditEvent, AuditLog, CaTrust, LogHead, Signed};
use ferry_types::{Digest32, HostName, MigrationId, SpiffeId, TrustDomain, VmName};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::audit::Audit;
use crate::evidence::{Addressed, Expect};

/// A peer's signed message that must not be believed.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("its signature does not verify")]
    Signature(#[source] AuditError),
    #[error("it is signed by {0}, not by a host")]
    NotAHost(SpiffeId),
    /// SECURITY: a valid signature by another host of the cluster is not
    /// this peer's word.
    #[error("it is signed by {actual}, not by {expected}")]
    WrongSigner { expected: HostName, actual: SpiffeId },
    #[error("it is about migration {id} of {vm} {from} -> {to}, not this one")]
    WrongAddress { id: MigrationId, vm: VmName, from: HostName, to: HostName },
    #[error("it is bound to another connection (replayed or relayed)")]
    WrongBinding,
    #[error("it is for {bytes} bytes / {digest}, not {want_bytes} bytes / {want_digest}")]
    WrongSum { bytes: u64, digest: Digest32, want_bytes: u64, want_digest: Digest32 },
}

/// Why an audit record could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AuditWriteError {
    #[error(transparent)]
    Log(#[from] AuditError),
    #[error("the audit log's lock is poisoned")]
    Poisoned,
    #[error("the audit task failed")]
    Task,
}

/// A mandatory audit record was not written: the step it guards must not happen.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the audit record ({kind})")]
pub struct AuditFailed {
    pub kind: &'static str,
    #[source]
    pub source: AuditWriteError,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot sign the {kind}")]
pub struct SignFailed {
    pub kind: &'static str,
    #[source]
    pub source: AuditWriteError,
}

/// Which migration an audit record is about.
#[derive(Clone, Copy)]
pub struct About<'a> {
    pub id: &'a MigrationId,
    pub vm: &'a VmName,
    pub peer: &'a HostName,
}

pub struct Notary {
    domain: TrustDomain,
    log: Arc<Mutex<AuditLog>>,
    ca: CaTrust,
}

impl Notary {
    pub fn new(domain: TrustDomain, log: AuditLog, ca: CaTrust) -> Self {
        Self { domain, log: Arc::new(Mutex::new(log)), ca }
    }

    /// Sign `body` as a `kind` message with this host's key.
    pub fn sign<T: Serialize>(&self, kind: &'static str, body: &T) -> Result<Signed, SignFailed> {
        let log =
            self.log.lock().map_err(|_| SignFailed { kind, source: AuditWriteError::Poisoned })?;
        Signed::sign(kind, body, log.signer())
            .map_err(|e| SignFailed { kind, source: AuditWriteError::Log(e) })
    }

    /// Where this host's log stands: signed bodies carry it so that the
    /// peer's log witnesses how far ours went.
    pub fn log_head(&self) -> LogHead {
        match self.log.lock() {
            Ok(l) => l.head(),
            Err(p) => p.into_inner().head(),
        }
    }

    /// A peer's signed message: signature, chain to the cluster CA, signer
    /// exactly `from` in our trust domain. Fields are the caller's to check.
    pub fn verify_signer<T: DeserializeOwned>(
        &self,
        signed: &Signed,
        kind: &str,
        from: &HostName,
    ) -> Result<T, EvidenceError> {
        let (body, signer) = signed.verify(kind, &self.ca).map_err(EvidenceError::Signature)?;
        match &signer {
            SpiffeId::Host { domain, name } if domain == &self.domain && name == from => Ok(body),
            SpiffeId::Host { .. } => {
                Err(EvidenceError::WrongSigner { expected: from.clone(), actual: signer })
            }
            SpiffeId::Operator { .. } => Err(EvidenceError::NotAHost(signer)),
        }
    }

    /// As [`verify_signer`](Self::verify_signer), and every address field
    /// as expected: the migration, both hosts, the VM and (on the same
    /// connection) the channel binding.
    pub fn verify_from<T: DeserializeOwned + Addressed>(
        &self,
        signed: &Signed,
        kind: &str,
        from: &HostName,
        expect: &Expect<'_>,
    ) -> Result<T, EvidenceError> {
        let body: T = self.verify_signer(signed, kind, from)?;
        let (id, source, destination, vm, binding) = body.address();
        if id != expect.id
            || source != expect.source
            || destination != expect.destination
            || vm != expect.vm
        {
            return Err(EvidenceError::WrongAddress {
                id: *id,
                vm: vm.clone(),
                from: source.clone(),
                to: destination.clone(),
            });
        }
        if expect.binding.is_some_and(|b| b != binding) {
            return Err(EvidenceError::WrongBinding);
        }
        Ok(body)
    }

    /// Append a record durably. Only a [`mandatory`](Audit::mandatory)
    /// record's failure is returned (the step must not happen); any other
    /// is logged here.
    pub async fn record(
        &self,
        audit: Audit,
        about: Option<About<'_>>,
        signed: Option<Signed>,
    ) -> Result<(), AuditFailed> {
        self.begin(vec![(audit, signed)], about).finish().await
    }

    /// Start appending `records` (in order, one write and one fdatasync)
    /// and return at once: the caller does other durable work meanwhile
    /// and must [`finish`](PendingAudit::finish) before anything that the
    /// records guard happens.
    pub fn begin(
        &self,
        records: Vec<(Audit, Option<Signed>)>,
        about: Option<About<'_>>,
    ) -> PendingAudit {
        let mut kinds = Vec::with_capacity(records.len());
        let events: Vec<AuditEvent> = records
            .into_iter()
            .map(|(audit, signed)| {
                kinds.push((audit.kind(), audit.mandatory()));
                AuditEvent {
                    kind: audit.kind().to_owned(),
                    migration_id: about.map(|a| a.id.to_string()),
                    vm: about.map(|a| a.vm.to_string()),
                    peer: about.map(|a| a.peer.to_string()),
                    detail: audit.detail(),
                    signed,
                }
            })
            .collect();
        let log = self.log.clone();
        let task = tokio::task::spawn_blocking(move || {
            let mut log = log.lock().map_err(|_| AuditWriteError::Poisoned)?;
            log.append_all(&events).map(drop).map_err(AuditWriteError::Log)
        });
        PendingAudit { kinds, task }
    }
}

/// Audit records being written (see [`Notary::begin`]).
#[must_use = "the records are durable only once `finish` returned Ok"]
pub struct PendingAudit {
    kinds: Vec<(&'static str, bool)>,
    task: tokio::task::JoinHandle<Result<(), AuditWriteError>>,
}

impl PendingAudit {
    /// Wait until the records are durable. Err only if a
    /// [`mandatory`](Audit::mandatory) one is among them (none was written:
    /// the step they guard must not happen); otherwise a failure is logged.
    pub async fn finish(self) -> Result<(), AuditFailed> {
        let written = self.task.await.unwrap_or(Err(AuditWriteError::Task));
        let Err(source) = written else { return Ok(()) };
        let mandatory = self.kinds.iter().find(|(_, m)| *m);
        let kind = mandatory.or(self.kinds.first()).map_or("none", |(k, _)| k);
        let e = AuditFailed { kind, source };
        if mandatory.is_some() {
            return Err(e);
        }
        tracing::error!(error = %crate::report::report(&e), "audit record not written");
        Ok(())
    }
}
