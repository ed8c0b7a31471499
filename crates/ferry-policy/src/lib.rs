//! Ferry's authorization (R3) and destination admission control.
//!
//! * [`PolicyEngine`]: Cedar policies, default deny, validated against the
//!   embedded [`SCHEMA`] at load; decisions are values ([`Decision`]) that
//!   name the policies (by `@id`) that made them.
//! * [`SharedPolicy`]: the engine in force, reloaded atomically (a broken
//!   file is refused and the old policy keeps deciding).
//! * [`Admission`] / [`RateLimiter`]: capacity, concurrency, per-peer rate
//!   and per-VM cooldown, with the clock passed in.
//!
//! Nothing here does network I/O; the only I/O is reading policy and
//! entities files at load.

mod admission;
mod engine;
mod error;
pub mod fuzz;
mod load;
mod types;

pub use admission::{
    Admission, AdmissionConfig, AdmissionTicket, RateLimiter, Refusal, RefusalKind,
};
pub use engine::{check_files, PolicyEffect, PolicyEngine, PolicyInfo, SharedPolicy, Summary};
pub use error::PolicyError;
pub use load::entity_hosts;
pub use types::{Action, Decision, Principal, Request, Resident, VmLabels, MAX_SECURITY_LEVEL};

/// The Cedar schema policies are validated against (Cedar schema syntax).
/// Shipped for operators as `docs/policy/ferry.cedarschema`.
pub const SCHEMA: &str = include_str!("ferry.cedarschema");

#[cfg(test)]
mod tests {
    /// The agent shares these across tasks and threads.
    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::PolicyEngine>();
        check::<crate::SharedPolicy>();
        check::<crate::Admission>();
        check::<crate::AdmissionTicket>();
        check::<crate::RateLimiter>();
    }
}
