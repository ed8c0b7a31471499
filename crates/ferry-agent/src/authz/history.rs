//! What the durable migration records say the admission limits had already
//! counted, so that an agent restart (or a crash provoked on purpose) does
//! not reset the cooldowns and rate windows (the survey's C1, C2, C4, C5).
//!
//! Pure: records and the clock in, events out; [`super::Authz`]
//! puts the events back into its limiters when the agent starts.

use std::time::Duration;

use ferry_types::{HostName, VmName};

use crate::records::{MigrationRecord, MigrationState, Role};

/// How far back each limit looks.
#[derive(Clone, Copy, Debug)]
pub struct Horizons {
    pub cooldown: Duration,
    pub outgoing_window: Duration,
    pub per_peer_window: Duration,
}

/// Events still inside their limit's horizon, as Unix milliseconds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The last time each VM arrived here or left (its cooldown runs from it).
    pub moves: Vec<(VmName, u64)>,
    /// Outgoing migrations this host started, by destination.
    pub outgoing: Vec<(HostName, u64)>,
    /// Incoming offers this host recorded, by source.
    pub incoming: Vec<(HostName, u64)>,
}

/// A move is over once the VM runs on the other side: completed, or handed
/// over in post-copy (the agent counts it when the copy finishes; counting
/// the hand-over instead errs towards the longer cooldown).
fn moved(state: MigrationState) -> bool {
    matches!(state, MigrationState::Completed | MigrationState::PostcopyActive)
}

/// Events from `records` younger than their horizon at `now_ms`. Times in
/// the future (the clock stepped back) count as now.
///
/// * Cooldown: from a moved record's last update, the moment it completed
///   (a later save only makes the cooldown longer).
/// * Outgoing rate: every source record, at its creation; the agent creates
///   the record right after the rate limiter counted the migration.
/// * Per-peer rate: every destination record, at its creation. The record is
///   written before admission decides, so offers refused by policy or by
///   admission count too: after a restart a peer's allowance can only be
///   smaller than before it, never larger.
pub fn history(records: &[MigrationRecord], now_ms: u64, h: Horizons) -> History {
    let within =
        |t: u64, horizon: Duration| u128::from(now_ms.saturating_sub(t)) < horizon.as_millis();
    let mut out = History::default();
    for r in records {
        if moved(r.state()) && within(r.updated_unix_ms, h.cooldown) {
            match out.moves.iter_mut().find(|(vm, _)| *vm == r.vm) {
                Some((_, t)) => *t = (*t).max(r.updated_unix_ms),
                None => out.moves.push((r.vm.clone(), r.updated_unix_ms)),
            }
        }
        match r.role {
            Role::Source if within(r.created_unix_ms, h.outgoing_window) => {
                out.outgoing.push((r.destination.clone(), r.created_unix_ms));
            }
            Role::Destination if within(r.created_unix_ms, h.per_peer_window) => {
                out.incoming.push((r.source.clone(), r.created_unix_ms));
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ferry_types::MigrationId;

    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const H: Horizons = Horizons {
        cooldown: Duration::from_secs(60),
        outgoing_window: Duration::from_secs(30),
        per_peer_window: Duration::from_secs(10),
    };

    /// A record of `vm` (role, state) created `age_s` ago and last saved
    /// `updated_s` ago, between host1 (source) and host2.
    fn rec(
        role: Role,
        vm: &str,
        state: MigrationState,
        age_s: u64,
        updated_s: u64,
    ) -> MigrationRecord {
        let mut r = MigrationRecord::new(
            MigrationId::new(),
            role,
            vm.parse().expect("vm"),
            "host1".parse().expect("host"),
            "host2".parse().expect("host"),
        );
        r.walk_to(state);
        r.created_unix_ms = NOW - age_s * 1000;
        r.updated_unix_ms = NOW - updated_s * 1000;
        r
    }

    fn names<T: ToString>(v: &[(T, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(n, t)| (n.to_string(), (NOW - t) / 1000)).collect()
    }

    #[test]
    fn completed_moves_start_cooldowns_in_both_roles() {
        use MigrationState::*;
        let records = [
            rec(Role::Source, "left", Completed, 20, 15),
            rec(Role::Destination, "arrived", Completed, 40, 35),
            rec(Role::Destination, "handed-over", PostcopyActive, 5, 4),
            rec(Role::Source, "old", Completed, 100, 90),
            rec(Role::Source, "aborted", Aborted, 5, 4),
            rec(Role::Source, "in-doubt", InDoubt, 5, 4),
        ];
        let h = history(&records, NOW, H);
        assert_eq!(
            names(&h.moves),
            [("left".into(), 15), ("arrived".into(), 35), ("handed-over".into(), 4)]
        );
    }

    #[test]
    fn the_latest_move_of_a_vm_decides_its_cooldown() {
        let records = [
            rec(Role::Destination, "web", MigrationState::Completed, 50, 45),
            rec(Role::Source, "web", MigrationState::Completed, 10, 8),
        ];
        assert_eq!(names(&history(&records, NOW, H).moves), [("web".into(), 8)]);
    }

    #[test]
    fn every_recent_record_counts_against_its_rate_window() {
        use MigrationState::*;
        let records = [
            rec(Role::Source, "a", Completed, 5, 4),
            rec(Role::Source, "b", Aborted, 29, 28),
            rec(Role::Source, "c", Completed, 31, 30),
            // Refused offers are aborted destination records: they count.
            rec(Role::Destination, "d", Aborted, 9, 9),
            rec(Role::Destination, "e", Transferring, 1, 1),
            rec(Role::Destination, "f", Completed, 11, 10),
        ];
        let h = history(&records, NOW, H);
        assert_eq!(names(&h.outgoing), [("host2".into(), 5), ("host2".into(), 29)]);
        assert_eq!(names(&h.incoming), [("host1".into(), 9), ("host1".into(), 1)]);
    }

    #[test]
    fn a_clock_stepped_back_keeps_future_events() {
        let mut future = rec(Role::Source, "f", MigrationState::Completed, 0, 0);
        future.created_unix_ms = NOW + 5_000;
        future.updated_unix_ms = NOW + 6_000;
        let h = history(&[future], NOW, H);
        assert_eq!(h.moves.len(), 1);
        assert_eq!(h.outgoing.len(), 1);
    }

    #[test]
    fn no_records_no_events() {
        assert_eq!(history(&[], NOW, H), History::default());
    }
}
