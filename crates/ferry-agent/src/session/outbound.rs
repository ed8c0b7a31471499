//! The source half's context: one outgoing migration and what every step
//! of it needs (its session, its VM, its plan, who watches it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_channel::StreamSum;
use ferry_types::{Digest32, HostName, MigrationId, VmName};
use tokio::sync::watch;

use super::machine::Session;
use crate::agent::Agent;
use crate::audit::Audit;
use crate::backend::VmDescription;
use crate::evidence::{self, AbortBody, Expect, StreamBody};
use crate::net::Writer;
use crate::plan::TransferPlan;
use crate::protocol::{PeerMessage, Progress};

pub struct Outbound {
    pub session: Session,
    pub vm: VmName,
    pub to: HostName,
    pub desc: VmDescription,
    pub plan: TransferPlan,
    /// Who asked for this migration (for the audit log).
    pub operator: String,
    pub progress: watch::Sender<Progress>,
    pub cancel: watch::Receiver<bool>,
    /// VM bytes sent on the main stream so far, for the progress display.
    pub bytes: Arc<AtomicU64>,
    pub started: Instant,
}

impl Outbound {
    pub fn agent(&self) -> &Arc<Agent> {
        &self.session.agent
    }

    pub fn id(&self) -> MigrationId {
        self.session.record().id
    }

    pub fn set_phase(&self, phase: &str) {
        self.progress.send_modify(|p| {
            p.phase = phase.to_owned();
            p.elapsed_ms = self.started.elapsed().as_millis() as u64;
        });
    }

    pub fn count(&self, total: u64) {
        self.bytes.store(total, Ordering::Relaxed);
    }

    pub fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    /// What a peer's signed message must be about; `binding` for messages
    /// on the same connection as the Offer.
    pub fn expect<'a>(&'a self, binding: Option<&'a Digest32>) -> Expect<'a> {
        let rec = self.session.record();
        Expect {
            id: &rec.id,
            source: &rec.source,
            destination: &rec.destination,
            vm: &rec.vm,
            binding,
        }
    }

    pub fn stream_body(&self, binding: Digest32, sum: StreamSum) -> StreamBody {
        let rec = self.session.record();
        StreamBody {
            migration_id: rec.id,
            source: rec.source.clone(),
            destination: rec.destination.clone(),
            vm: rec.vm.clone(),
            channel_binding: binding,
            log_head: self.agent().notary.log_head(),
            bytes: sum.bytes,
            digest: sum.digest,
            qemu_downtime_ms: None,
        }
    }

    /// Tell the destination to abort, signed when possible. Best effort:
    /// the source rolls back whatever the destination hears.
    pub async fn send_abort(&self, writer: &mut Writer, binding: &Digest32, reason: String) {
        let rec = self.session.record();
        let body = AbortBody {
            migration_id: rec.id,
            source: rec.source.clone(),
            destination: rec.destination.clone(),
            vm: rec.vm.clone(),
            channel_binding: *binding,
            log_head: self.agent().notary.log_head(),
            reason: reason.clone(),
        };
        let signed = self.agent().notary.sign(evidence::ABORT, &body).ok();
        let _ =
            self.session.audit(Audit::AbortSent { reason: reason.clone() }, signed.clone()).await;
        let abort = PeerMessage::Abort { migration_id: rec.id, reason, signed };
        let _ = writer.write_control(&abort).await;
    }
}
