//! The Ferry agent: one per hypervisor host. It serves the operator API and
//! the peer migration protocol on one mTLS listener, runs both halves of
//! each migration as an explicit state machine (ferry-session's table,
//! driven by [`session`]), keeps durable records of every migration so that
//! a restart never leaves a VM running twice or lost, and moves VMs through
//! a [`backend`] (Ferry-owned QEMUs today).
//!
//! From the bottom up: [`plan`], [`records`], [`protocol`], [`evidence`],
//! [`notary`] (signatures and the audit log), [`attestation`], [`checks`]
//! (the proofs each step requires), [`vtpm`] (no stale vTPM is adopted),
//! [`authz`], [`backend`], [`net`];
//! [`agent`] ties them together; [`session`] moves VMs; [`api`] and
//! [`server`] face operators and peers; [`startup`] builds an agent.

pub mod agent;
pub mod api;
pub mod attestation;
pub mod audit;
pub mod authz;
pub mod backend;
pub mod checks;
pub mod config;
pub mod error;
pub mod evidence;
pub mod inflight;
pub mod metrics;
pub mod metrics_http;
pub mod net;
pub mod notary;
pub mod plan;
pub mod preflight;
pub mod protocol;
pub mod records;
pub mod refusals;
pub mod report;
pub mod server;
pub mod session;
pub mod startup;
pub mod vtpm;

#[cfg(test)]
mod testing;

pub use agent::Agent;
pub use config::AgentConfig;
pub use error::Error;
pub use protocol::{ApiRequest, ApiResponse, ErrorKind};
pub use records::{MigrationRecord, MigrationState, Role};
pub use report::report;
pub use startup::{Parts, StartError};
