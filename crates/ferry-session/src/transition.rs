//! The one function that says where a migration may go.

use crate::rows::ROWS;
use crate::state::{Event, IllegalTransition, MigrationState, Role, Step};

/// Where `event` takes a `role` migration that stands at `from`.
pub fn next(role: Role, from: MigrationState, event: Event) -> Result<Step, IllegalTransition> {
    ROWS.iter()
        .find(|(r, f, o, ..)| *r == role && *f == from && o.matches(event))
        .map(|(_, _, _, to, effects, outcome)| Step { to: *to, effects, outcome: *outcome })
        .ok_or(IllegalTransition { role, from, event })
}
