//! The destination half's context: one incoming migration after its Offer
//! was checked and recorded.

use std::sync::Arc;
use std::time::Instant;

use ferry_types::Digest32;

use super::machine::Session;
use crate::agent::Agent;
use crate::audit::Audit;
use crate::evidence::{self, AbortBody, Expect, OfferBody, StreamBody};
use crate::net::Writer;
use crate::plan::TransferPlan;
use crate::protocol::PeerMessage;

pub struct Inbound {
    pub session: Session,
    pub offer: OfferBody,
    pub plan: TransferPlan,
    pub started: Instant,
}

impl Inbound {
    pub fn agent(&self) -> &Arc<Agent> {
        &self.session.agent
    }

    /// What the source's signed messages must be about: this migration, on
    /// this connection.
    pub fn expect(&self) -> Expect<'_> {
        let o = &self.offer;
        Expect {
            id: &o.migration_id,
            source: &o.source,
            destination: &o.destination,
            vm: &o.vm,
            binding: Some(&o.channel_binding),
        }
    }

    pub fn stream_body(&self, bytes: u64, digest: Digest32) -> StreamBody {
        let o = &self.offer;
        StreamBody {
            migration_id: o.migration_id,
            source: o.source.clone(),
            destination: o.destination.clone(),
            vm: o.vm.clone(),
            channel_binding: o.channel_binding,
            log_head: self.agent().notary.log_head(),
            bytes,
            digest,
            qemu_downtime_ms: None,
        }
    }

    /// Tell the source (signed) that this host will never run the VM. The
    /// caller applies the failure: the table discards the incoming VM.
    pub async fn send_abort(&self, writer: &mut Writer, reason: &str) {
        let o = &self.offer;
        let body = AbortBody {
            migration_id: o.migration_id,
            source: o.source.clone(),
            destination: o.destination.clone(),
            vm: o.vm.clone(),
            channel_binding: o.channel_binding,
            log_head: self.agent().notary.log_head(),
            reason: reason.to_owned(),
        };
        let signed = self.agent().notary.sign(evidence::ABORT, &body).ok();
        let audit = Audit::AbortSent { reason: reason.to_owned() };
        let _ = self.session.audit(audit, signed.clone()).await;
        let abort =
            PeerMessage::Abort { migration_id: o.migration_id, reason: reason.to_owned(), signed };
        let _ = writer.write_control(&abort).await;
    }
}
