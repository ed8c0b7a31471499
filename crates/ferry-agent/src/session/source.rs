//! Starting an outgoing migration (an operator's request) and settling it
//! when its transfer ends, however that happens.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use ferry_session::{Event, MigrationState};
use ferry_types::{HostName, MigrationId, OperatorName, VmName};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::machine::Session;
use super::outbound::Outbound;
use super::transfer;
use crate::agent::Agent;
use crate::audit::Audit;
use crate::error::Error;
use crate::notary::About;
use crate::plan::TransferPlan;
use crate::protocol::Progress;
use crate::records::{MigrationRecord, Role};
use crate::report::report;

/// How an outgoing migration ended: its record, and why it did not
/// complete if it did not.
pub struct Finished {
    pub record: MigrationRecord,
    pub error: Option<Error>,
}

/// Who asked for a migration.
pub struct Requester<'a> {
    pub operator: &'a OperatorName,
    pub role: &'a str,
}

/// Authorize, reserve the VM, write the first record and start the
/// migration's task.
pub async fn start(
    agent: Arc<Agent>,
    vm: VmName,
    to: HostName,
    who: Requester<'_>,
    plan: TransferPlan,
) -> Result<(MigrationId, watch::Receiver<Progress>, JoinHandle<Finished>), Error> {
    if to == agent.host {
        return Err(Error::SelfDestination { host: to });
    }
    super::link::address(&agent, &to)?;
    let id = MigrationId::new();
    let desc = agent.backend.hold(&vm, id).await.map_err(|e| match e {
        crate::backend::BackendError::NoSuchVm(vm) => {
            Error::NoSuchVm { vm, host: agent.host.clone() }
        }
        crate::backend::BackendError::Busy { vm, id } => Error::VmBusy { vm, id },
        other => Error::Backend(other),
    })?;
    // SECURITY (R3): default deny; a denial is a value with a reason,
    // audited, and nothing has been touched.
    let decision = agent.authz.authorize_outgoing(
        who.operator,
        who.role,
        &vm,
        &desc.labels,
        &agent.host,
        &to,
        plan.postcopy(),
        agent.attestation.enabled(),
    );
    if let Err(denied) = decision {
        agent.backend.release(&vm, id).await;
        agent.metrics.refused("policy");
        let reason = denied.to_string();
        let audit =
            Audit::Denied { operator: who.operator.to_string(), role: who.role.into(), reason };
        let about = About { id: &id, vm: &vm, peer: &to };
        let _ = agent.notary.record(audit, Some(about), None).await;
        return Err(denied);
    }
    let mut rec =
        MigrationRecord::new(id, Role::Source, vm.clone(), agent.host.clone(), to.clone());
    rec.streams = plan.streams().get();
    rec.postcopy = plan.postcopy();
    // Fail closed: a migration without a durable record must not start.
    if let Err(e) = agent.records.create(&mut rec) {
        agent.backend.release(&vm, id).await;
        return Err(Error::Record(e));
    }
    let (progress, watcher) =
        watch::channel(Progress { id: Some(id), phase: "connect".into(), ..Default::default() });
    let cancel = agent.sessions.begin(id, watcher.clone()).await;
    let out = Outbound {
        session: Session::new(agent.clone(), rec),
        vm,
        to,
        desc,
        plan,
        operator: format!("{} (role {})", who.operator, who.role),
        progress,
        cancel,
        bytes: Arc::new(AtomicU64::new(0)),
        started: Instant::now(),
    };
    let span = tracing::info_span!("migration", migration_id = %id, vm = %out.vm, peer = %out.to, role = "source");
    let done = tokio::spawn(tracing::Instrument::instrument(run(out), span));
    Ok((id, watcher, done))
}

async fn run(mut out: Outbound) -> Finished {
    tracing::info!("migration started");
    let result = transfer::run(&mut out).await;
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            let state = out.session.state();
            // Before the hand-over a peer's abort is its promise never to
            // run the VM (after the Commit only a verified, signed one
            // becomes a PeerAborted error); everything else is a failure,
            // and the table decides what that means from where it stands.
            let event = match state {
                MigrationState::Preparing
                | MigrationState::Transferring
                | MigrationState::Committed
                    if e.is_peer_abort() =>
                {
                    Event::PeerAborted
                }
                _ => Event::Failed,
            };
            let note = failure_note(&out, &e, state);
            tracing::warn!(error = %report(&e), ?state, "migration did not complete");
            if let Err(bug) = out.session.apply(event, Some(note)).await {
                tracing::error!(error = %report(&bug), "cannot settle the migration");
            }
            Some(e)
        }
    };
    let phase = out.session.state().name();
    out.set_phase(phase);
    out.agent().sessions.end(&out.id()).await;
    Finished { record: out.session.into_record(), error }
}

/// What the record says about a failure, with what it means for the VM.
fn failure_note(out: &Outbound, e: &Error, state: MigrationState) -> String {
    let (host, to) = (&out.agent().host, &out.to);
    let why = report(e);
    match state {
        MigrationState::Committed => format!(
            "{why}; the VM is paused on {host} until {to} says what became of it (this agent \
             keeps asking; `ferry migrations resolve {}` asks now)",
            out.id()
        ),
        MigrationState::PostcopyActive => format!(
            "{why}; post-copy was interrupted after {to} took over the VM: it runs there, and \
             the pages it still lacks are only in {host}'s QEMU, which is kept paused. Do not \
             stop either QEMU; {}",
            recover_advice(out.agent(), &out.id())
        ),
        _ => format!("{why}; the VM runs on {host} again"),
    }
}

/// What an operator should do about an interrupted post-copy.
pub fn recover_advice(agent: &Agent, id: &MigrationId) -> String {
    match agent.cfg.migration.postcopy_recover_retry() {
        Some(d) => format!(
            "this agent resumes it on its own once the link is back (first try in {} ms, then \
             at most every minute), or run `ferry migrations recover {id}`",
            d.as_millis()
        ),
        None => format!("once the link is back, run `ferry migrations recover {id}`"),
    }
}
