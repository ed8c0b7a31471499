//! The fast test tier: two real agents in this process (real TLS, Cedar,
//! records, audit logs, the real session code) with fake VMs and fake
//! TPMs, and a proxy between them a test can cut. Migrations take
//! milliseconds, so the protocol's edge cases are tested case by case.

pub mod lab;
pub mod platform;
pub mod proxy;
#[cfg(test)]
mod restarts;
#[cfg(test)]
mod scenarios;
pub mod tls;
