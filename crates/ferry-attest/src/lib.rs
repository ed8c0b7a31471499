//! TPM 2.0 platform attestation for Ferry (requirement R1; docs/attestation.md;
//! docs/protocol.md, steps 2–3).
//!
//! - **Enrollment** ([`enroll`], or its halves [`request_enrollment`],
//!   [`make_credential`], [`activate_credential`], [`check_activation`]): a
//!   host creates an attestation key (AK) in its TPM; the enrollment authority
//!   checks the host's EK certificate against trusted TPM-manufacturer CAs and
//!   proves, by MakeCredential/ActivateCredential, that the AK lives in that
//!   TPM. Only then is the AK recorded in the [`AkRegistry`].
//! - **Quoting** ([`Attester`]): per migration, each side quotes its PCRs with
//!   [`qualifying_data`] derived from the TLS exporter of *this* connection,
//!   the migration id and its role.
//! - **Verification** ([`verify`]): pure Rust, no TPM. Signature by the
//!   enrolled AK of the claimed host, channel binding, PCR selection, PCR
//!   digest, and every PCR against the [`ReferenceValues`].
//! - **swtpm** ([`Swtpm`]): manufacturer CA, provisioning and daemons for
//!   tests, the lab and the demo.
//!
//! Production hosts: the reference values for PCRs 0–7 come from the
//! platform's firmware measurements. Take them with `ferry attest measure` on
//! a known-good host of each class, or compute them by replaying the TCG event
//! log (`/sys/kernel/security/tpm0/binary_bios_measurements`, e.g. with
//! `tpm2_eventlog`) and checking that the replay equals the PCRs read.

mod credential;
mod error;
mod evidence;
mod refs;
mod registry;
mod swtpm;
mod tcti;
mod tpm;
mod verify;
mod wire;

pub use credential::{
    check_activation, check_ek_cert, make_credential, ActivationResponse, CredentialChallenge,
    EnrollmentRequest, PendingEnrollment, MAX_AK_PUBLIC, MAX_EK_CERT,
};
pub use error::AttestError;
pub use evidence::{
    qualifying_data, Evidence, QuoteRole, MAX_ATTEST, MAX_EVIDENCE_JSON, MAX_PCRS, MAX_SIGNATURE,
};
pub use refs::{ReferenceValues, MAX_REFERENCE_FILE};
pub use registry::{AkRegistry, EnrolledAk, MAX_RECORD_FILE};
pub use swtpm::{free_port_pair, Swtpm};
pub use tcti::{probe as probe_tcti, TctiProbe};
pub use tpm::{
    activate_credential, enroll, extend_pcr, read_pcrs, request_enrollment, AkBlob, Attester,
};
pub use verify::{verify, EvidenceVerified};

/// PCRs quoted by default: the platform firmware and boot measurements
/// (0 firmware, 1 firmware config, 2–3 option ROMs, 4–5 boot loader and its
/// config, 6 platform specific, 7 Secure Boot policy).
pub const DEFAULT_PCR_SELECTION: [u8; 8] = [0, 1, 2, 3, 4, 5, 6, 7];
