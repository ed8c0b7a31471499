//! Mutual platform attestation for one migration (R1; docs/protocol.md,
//! step 3): each side quotes its TPM with qualifying data derived from this
//! connection's channel binding, the migration id and its role, and verifies
//! the other's quote against the enrolled AKs and the reference values. A
//! verified peer becomes a [`PeerAttested`], which the Offer requires.

use std::time::Instant;

use async_trait::async_trait;
use ferry_attest::{AkBlob, AkRegistry, Attester, Evidence, QuoteRole, ReferenceValues};
use ferry_identity::{ChannelBinding, PeerAuthenticated};
use ferry_types::{HostName, MigrationId};
use serde::{Deserialize, Serialize};

use crate::config::AttestationPaths;
use crate::report::report;

/// What a migration record says about attestation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AttestationOutcome {
    /// The peer's quote was verified (signature, enrolled AK, binding, PCRs).
    pub peer_verified: bool,
    /// This host sent a quote.
    pub quoted: bool,
    /// PCRs the peer's quote covered.
    pub peer_pcrs: Vec<u8>,
    /// Time to quote and verify, both directions, in ms.
    pub ms: u64,
}

/// Proof that the peer on this connection is the host it must be (R2) and
/// that its platform evidence was verified for this connection and this
/// migration (R1), or that this host's attestation is explicitly,
/// insecurely off, which the outcome says. Only [`Attestation::verify_peer`]
/// makes one; the Offer is built from it and checked against it.
#[derive(Debug)]
pub struct PeerAttested {
    peer: PeerAuthenticated,
    id: MigrationId,
    outcome: AttestationOutcome,
}

impl PeerAttested {
    pub fn host(&self) -> &HostName {
        self.peer.host()
    }
    pub fn binding(&self) -> &ChannelBinding {
        self.peer.binding()
    }
    pub fn migration(&self) -> &MigrationId {
        &self.id
    }
    pub fn outcome(&self) -> &AttestationOutcome {
        &self.outcome
    }
}

/// A platform's root of trust: the host's TPM in production.
#[async_trait]
pub trait Platform: Send + Sync {
    /// Quote this host's PCRs over `qualifying_data`.
    async fn quote(&self, qualifying_data: [u8; 32]) -> Result<Evidence, String>;
    /// Check a peer's evidence against its enrolled AK and the reference
    /// values; returns the PCRs it covered.
    fn verify(
        &self,
        peer: &HostName,
        evidence: &Evidence,
        qualifying_data: &[u8; 32],
    ) -> Result<Vec<u8>, String>;
}

pub struct Attestation {
    /// None: attestation is (insecurely) disabled on this host.
    platform: Option<Box<dyn Platform>>,
}

impl Attestation {
    pub fn new(platform: Option<Box<dyn Platform>>) -> Self {
        if platform.is_none() {
            tracing::warn!(
                "INSECURE: attestation is disabled ([attestation] insecure_disabled = true): this \
                 host neither proves its platform nor checks its peers'; every migration is marked"
            );
        }
        Self { platform }
    }

    pub fn enabled(&self) -> bool {
        self.platform.is_some()
    }

    /// Quote in `role` for this connection and migration; None when disabled.
    pub async fn quote(
        &self,
        binding: &ChannelBinding,
        id: &MigrationId,
        role: QuoteRole,
    ) -> Result<Option<Evidence>, String> {
        let Some(platform) = &self.platform else { return Ok(None) };
        let qd = ferry_attest::qualifying_data(binding.as_bytes(), id, role);
        platform.quote(qd).await.map(Some)
    }

    /// Verify the peer's evidence for `peer_role`. Err names the host and,
    /// for a PCR mismatch, the PCR and both values.
    pub fn verify_peer(
        &self,
        peer: PeerAuthenticated,
        evidence: Option<&Evidence>,
        id: MigrationId,
        peer_role: QuoteRole,
        started: Instant,
    ) -> Result<PeerAttested, String> {
        let quoted = self.enabled();
        let ms = |s: Instant| s.elapsed().as_millis() as u64;
        let Some(platform) = &self.platform else {
            let outcome = AttestationOutcome { quoted, ms: ms(started), ..Default::default() };
            return Ok(PeerAttested { peer, id, outcome });
        };
        // SECURITY: with attestation on, a peer without a quote is refused;
        // only this host's own explicit insecure setting could allow it.
        let evidence = evidence.ok_or_else(|| {
            format!("{} presented no TPM quote (its attestation is disabled)", peer.host())
        })?;
        let qd = ferry_attest::qualifying_data(peer.binding().as_bytes(), &id, peer_role);
        let pcrs = platform.verify(peer.host(), evidence, &qd)?;
        let outcome =
            AttestationOutcome { peer_verified: true, quoted, peer_pcrs: pcrs, ms: ms(started) };
        Ok(PeerAttested { peer, id, outcome })
    }
}

/// The host's TPM (hardware, or swtpm in tests and the lab).
pub struct Tpm {
    host: HostName,
    paths: AttestationPaths,
}

impl Tpm {
    pub fn new(host: HostName, paths: AttestationPaths) -> Self {
        Self { host, paths }
    }
}

#[async_trait]
impl Platform for Tpm {
    async fn quote(&self, qd: [u8; 32]) -> Result<Evidence, String> {
        let p = self.paths.clone();
        let refs = ReferenceValues::load(&p.reference_values).map_err(|e| report(&e))?;
        // Quote exactly the PCRs a verifier expects for this host's class.
        let selection = refs
            .selection_for(&self.host)
            .unwrap_or_else(|| ferry_attest::DEFAULT_PCR_SELECTION.to_vec());
        tokio::task::spawn_blocking(move || {
            let ak = AkBlob::load(&p.ak).map_err(|e| report(&e))?;
            // The TPM context is not Send: open it on this blocking thread.
            let mut attester = Attester::open(&p.tcti, &ak).map_err(|e| report(&e))?;
            attester
                .quote(&selection, &qd)
                .map_err(|e| format!("cannot quote with the local TPM: {}", report(&e)))
        })
        .await
        .map_err(|e| format!("quote task failed: {e}"))?
    }

    fn verify(
        &self,
        peer: &HostName,
        evidence: &Evidence,
        qd: &[u8; 32],
    ) -> Result<Vec<u8>, String> {
        let registry = AkRegistry::load(&self.paths.registry).map_err(|e| report(&e))?;
        let refs = ReferenceValues::load(&self.paths.reference_values).map_err(|e| report(&e))?;
        let ak = registry.require(peer).map_err(|e| report(&e))?;
        let verified =
            ferry_attest::verify(evidence, ak, peer, qd, &refs).map_err(|e| report(&e))?;
        Ok(verified.pcrs)
    }
}
