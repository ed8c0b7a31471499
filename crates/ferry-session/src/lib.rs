//! The migration session's transition table: where a migration may go from
//! where it stands, on each side, and what must happen to the VM when it
//! does. Pure data and one pure function ([`next`]); the agent's `Session::apply` is
//! the only caller that changes a record's state, and only with a [`Step`]
//! this table returned.
//!
//! The one rule it encodes: the source keeps its copy until the destination
//! has signed for it. Before the Commit any failure rolls the source back;
//! after it only a Receipt lets the source retire its copy and only an Abort
//! lets it resume; anything else leaves the copy paused, in doubt, until the
//! destination answers. docs/session.md shows this table as diagrams, generated
//! from [`ROWS`] by [`diagram::render`] and checked by a test.

mod diagram;
mod rows;
mod state;
mod transition;

pub use diagram::render as render_docs;
pub use rows::{Row, ROWS};
pub use state::*;
pub use transition::next;

#[cfg(test)]
mod tests;
