//! The destination's checks, each a pure function that mints the proof the
//! next step requires: [`check_offer`] makes a [`CheckedOffer`] from a
//! verified Offer of an attested peer; [`admit`] makes an [`AdmittedOffer`]
//! (the only thing a VM is launched for); [`resume_verdict`] makes a
//! [`DigestsMatch`] (the only thing that lets a VM run).

use ferry_channel::StreamSum;
use ferry_types::MigrationId;

use crate::attestation::PeerAttested;
use crate::evidence::OfferBody;
use crate::plan::TransferPlan;
use crate::protocol::offer_binding;

/// Allowed clock skew between hosts when checking an offer's window.
pub const CLOCK_SKEW_MS: u64 = 30_000;

/// Why the destination refused, with a short stable code for metrics
/// (never peer text: the label set stays bounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub reason: String,
}

impl Refusal {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

/// What `check_offer` compares the offer with: facts of this host and of
/// this connection, never anything the peer said.
pub struct OfferContext<'a> {
    pub this_host: &'a ferry_types::HostName,
    pub now_unix_ms: u64,
    pub offer_validity_ms: u64,
}

/// An offer whose signer, address, binding, window, spec, plan and labels
/// are all right for this host and this connection.
#[derive(Debug)]
pub struct CheckedOffer {
    offer: OfferBody,
    plan: TransferPlan,
}

impl CheckedOffer {
    pub fn offer(&self) -> &OfferBody {
        &self.offer
    }
    pub fn plan(&self) -> TransferPlan {
        self.plan
    }
}

/// Check an Offer (its signature by `peer` already verified) before
/// anything is recorded or launched.
pub fn check_offer(
    ctx: &OfferContext<'_>,
    peer: &PeerAttested,
    offer: OfferBody,
) -> Result<CheckedOffer, Refusal> {
    if &offer.destination != ctx.this_host {
        let why = format!("offer is addressed to {}, this is {}", offer.destination, ctx.this_host);
        return Err(Refusal::new("misaddressed", why));
    }
    if &offer.source != peer.host() {
        let why = format!(
            "offer claims source {} but the connection is from {}",
            offer.source,
            peer.host()
        );
        return Err(Refusal::new("source_mismatch", why));
    }
    if offer.migration_id != *peer.migration() {
        let why = format!(
            "offer for {} on a connection attested for {}",
            offer.migration_id,
            peer.migration()
        );
        return Err(Refusal::new("binding", why));
    }
    // SECURITY: the binding ties the offer to this TLS connection; a
    // recorded offer replayed on another connection cannot match.
    if offer.channel_binding != offer_binding(peer.binding().as_bytes(), &offer.migration_id) {
        let why = "offer is not bound to this connection (replayed or relayed)";
        return Err(Refusal::new("binding", why));
    }
    check_window(ctx, &offer.migration_id, offer.not_after_unix_ms)?;
    offer.spec.validate().map_err(|e| Refusal::new("spec", format!("invalid VM spec: {e}")))?;
    if offer.spec.name != offer.vm {
        let why =
            format!("offer is for VM {} but carries the spec of {}", offer.vm, offer.spec.name);
        return Err(Refusal::new("spec", why));
    }
    let plan = TransferPlan::new(offer.streams, offer.postcopy)
        .map_err(|e| Refusal::new("streams", e.to_string()))?;
    if let Some(problem) = offer.labels.problem() {
        return Err(Refusal::new("labels", format!("VM labels: {problem}")));
    }
    Ok(CheckedOffer { offer, plan })
}

fn check_window(ctx: &OfferContext<'_>, id: &MigrationId, not_after: u64) -> Result<(), Refusal> {
    let now = ctx.now_unix_ms;
    let created = id.created_unix_ms();
    if created > now + CLOCK_SKEW_MS {
        return Err(Refusal::new("window", "migration id is from the future"));
    }
    let not_after = not_after.min(created + ctx.offer_validity_ms);
    if now > not_after + CLOCK_SKEW_MS {
        return Err(Refusal::new("window", format!("offer expired {} ms ago", now - not_after)));
    }
    Ok(())
}

/// An offer this host checked, authorized, admitted and reserved a name
/// for: the only thing an incoming VM is launched for. It holds what the
/// admission decision reserved (capacity, the VM as an arriving resident)
/// until the migration ends.
pub struct AdmittedOffer {
    checked: CheckedOffer,
    _reservation: Box<dyn std::any::Any + Send + Sync>,
}

impl std::fmt::Debug for AdmittedOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittedOffer").field("checked", &self.checked).finish_non_exhaustive()
    }
}

impl AdmittedOffer {
    pub fn offer(&self) -> &OfferBody {
        &self.checked.offer
    }
    pub fn plan(&self) -> TransferPlan {
        self.checked.plan
    }
}

/// Policy and admission decided (`decision`), and whether the VM's name is
/// free here. A denial is a value with a reason, not an error.
pub fn admit<R: Send + Sync + 'static>(
    checked: CheckedOffer,
    decision: Result<R, Refusal>,
    name_free: bool,
    this_host: &ferry_types::HostName,
) -> Result<AdmittedOffer, Refusal> {
    let reservation = decision?;
    if !name_free {
        let why = format!("a VM named {} already exists on {this_host}", checked.offer.vm);
        return Err(Refusal::new("name_conflict", why));
    }
    Ok(AdmittedOffer { checked, _reservation: Box::new(reservation) })
}

/// The destination's QEMU loaded the stream, and the count and digest that
/// arrived equal what the source signed in its Commit. Only
/// [`resume_verdict`] makes one; only a `DigestsMatch` lets the VM run.
#[derive(Debug)]
pub struct DigestsMatch {
    sum: StreamSum,
}

impl DigestsMatch {
    pub fn sum(&self) -> StreamSum {
        self.sum
    }
}

/// SECURITY: all three must agree before the VM may run here: QEMU
/// loaded the stream, and bytes and digest equal the signed Commit's.
pub fn resume_verdict(
    committed: StreamSum,
    received: StreamSum,
    loaded: Result<(), String>,
) -> Result<DigestsMatch, String> {
    if let Err(why) = loaded {
        return Err(format!("the destination QEMU did not complete the incoming migration: {why}"));
    }
    if committed.bytes != received.bytes {
        return Err(format!(
            "byte count mismatch: the source sent {} bytes, {} arrived",
            committed.bytes, received.bytes
        ));
    }
    if committed.digest != received.digest {
        return Err(format!(
            "digest mismatch: the source committed to {}, the stream received hashes to {}",
            committed.digest, received.digest
        ));
    }
    Ok(DigestsMatch { sum: received })
}

#[cfg(test)]
#[path = "checks_tests.rs"]
mod tests;
