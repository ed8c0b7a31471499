//! The migration session: both halves of a migration, driven through the
//! transition table of ferry-session. Each step that the security design
//! orders takes its proof by value (crate::checks); every state change goes
//! through [`machine::Session::apply`], which also does what the change
//! means for the VM, in an order that survives a crash.
//!
//! * [`source`], [`handshake`], [`transfer`]: the source half (connect,
//!   attest, offer, stream, commit, answer), with [`outbound`] its context.
//! * [`destination`], [`receive`], [`word`]: the destination half, with
//!   [`inbound`].
//! * [`postcopy_source`], [`postcopy_destination`], [`recover`]: post-copy.
//! * [`control`], [`managed`]: migrations libvirt runs (its control
//!   connection; the destination's stream, gated by QEMU's return path).
//! * [`verdict`]: what a committed source may believe (pure).
//! * [`resolve`], [`lost`]: what a source asks or tells its destination
//!   later, on a new connection; [`supervisor`] runs those loops.
//! * [`restart`]: settling every migration after an agent restart.

pub mod control;
pub mod destination;
pub mod handshake;
pub mod inbound;
pub mod link;
pub mod lost;
pub mod machine;
pub mod managed;
pub mod outbound;
pub mod peer_watch;
pub mod postcopy_destination;
pub mod postcopy_source;
pub mod receive;
pub mod recover;
pub mod resolve;
pub mod restart;
pub mod source;
pub mod streams;
pub mod supervisor;
pub mod transfer;
pub mod verdict;
pub mod word;

pub use machine::Session;
