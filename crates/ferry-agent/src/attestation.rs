//! Mutual platform attestation for one migration (docs/protocol.md, step 3): each
//! side quotes with qualifying data derived from this connection's TLS
//! exporter, the migration id and its role, and verifies the other's quote
//! against the enrolled AKs and the reference values.

use std::time::Instant;

use ferry_attest::{AkBlob, AkRegistry, Attester, Evidence, QuoteRole, ReferenceValues};
use ferry_types::{HostName, MigrationId};
use serde::{Deserialize, Serialize};

use crate::config::AttestationPaths;

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

pub struct Attestation {
    host: HostName,
    paths: Option<AttestationPaths>,
}

impl Attestation {
    pub fn new(host: HostName, paths: Option<AttestationPaths>) -> Self {
        if paths.is_none() {
            tracing::warn!(
                "INSECURE: attestation is disabled ([attestation] insecure_disabled = true): this host \
                 neither proves its platform nor checks its peers'; every migration is marked"
            );
        }
        Self { host, paths }
    }

    pub fn enabled(&self) -> bool {
        self.paths.is_some()
    }

    /// Quote in `role` for this connection and migration; None when disabled.
    pub async fn quote(
        &self,
        exporter: &[u8; 32],
        id: &MigrationId,
        role: QuoteRole,
    ) -> Result<Option<Evidence>, String> {
        let Some(p) = self.paths.clone() else { return Ok(None) };
        let qd = ferry_attest::qualifying_data(exporter, id, role);
        let refs = ReferenceValues::load(&p.reference_values).map_err(|e| crate::chain(&e))?;
        // Quote exactly the PCRs a verifier expects for this host's class.
        let selection = refs
            .selection_for(&self.host)
            .unwrap_or_else(|| ferry_attest::DEFAULT_PCR_SELECTION.to_vec());
        tokio::task::spawn_blocking(move || {
            let ak = AkBlob::load(&p.ak).map_err(|e| crate::chain(&e))?;
            // The TPM context is not Send: open it on this blocking thread.
            let mut attester = Attester::open(&p.tcti, &ak).map_err(|e| crate::chain(&e))?;
            attester
                .quote(&selection, &qd)
                .map_err(|e| format!("cannot quote with the local TPM: {}", crate::chain(&e)))
        })
        .await
        .map_err(|e| format!("quote task failed: {e}"))?
        .map(Some)
    }

    /// Verify the peer's evidence for `peer_role`. Err names the host and,
    /// for a PCR mismatch, the PCR and both values.
    pub fn verify_peer(
        &self,
        peer: &HostName,
        evidence: Option<&Evidence>,
        exporter: &[u8; 32],
        id: &MigrationId,
        peer_role: QuoteRole,
        started: Instant,
    ) -> Result<AttestationOutcome, String> {
        let Some(p) = &self.paths else {
            return Ok(AttestationOutcome {
                peer_verified: false,
                quoted: false,
                peer_pcrs: vec![],
                ms: started.elapsed().as_millis() as u64,
            });
        };
        // SECURITY: with attestation on, a peer without a quote is refused;
        // only this host's own explicit insecure setting could allow it.
        let evidence = evidence.ok_or_else(|| {
            format!("{peer} presented no TPM quote (its attestation is disabled)")
        })?;
        let registry = AkRegistry::load(&p.registry).map_err(|e| crate::chain(&e))?;
        let refs = ReferenceValues::load(&p.reference_values).map_err(|e| crate::chain(&e))?;
        let ak = registry.require(peer).map_err(|e| crate::chain(&e))?;
        let qd = ferry_attest::qualifying_data(exporter, id, peer_role);
        let verified =
            ferry_attest::verify(evidence, ak, peer, &qd, &refs).map_err(|e| crate::chain(&e))?;
        // `quoted` (whether this host sent a quote) is for the caller to set.
        Ok(AttestationOutcome {
            peer_verified: true,
            quoted: false,
            peer_pcrs: verified.pcrs.clone(),
            ms: started.elapsed().as_millis() as u64,
        })
    }
}
