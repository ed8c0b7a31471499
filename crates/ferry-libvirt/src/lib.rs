//! What Ferry needs of libvirt to carry its domains' migrations:
//!
//! * [`client`]: libvirt's API through the libvirt project's own bindings.
//! * [`rpc`], [`xdr`], [`filter`]: libvirt's daemon-to-daemon framing and
//!   the destination's allowlist of what a migration may ask of it.
//! * [`domain`]: identity, size, vTPM and labels from a domain's XML.
//! * [`return_path`]: QEMU's return path, read so its last word can wait.
//! * [`local`]: who may connect to a migration's local sockets.
//! * [`vtpm`]: which vTPMs can move, where libvirt keeps their state.

pub mod client;
pub mod domain;
pub mod filter;
pub mod fuzz;
pub mod local;
pub mod return_path;
pub mod rpc;
pub mod vtpm;
pub mod xdr;

pub use client::{Libvirt, LibvirtError};
pub use domain::{DomainError, DomainFacts};
pub use filter::{ControlFilter, Expected, Refused};
