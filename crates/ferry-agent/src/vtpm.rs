//! No rollback, no clone of a vTPM on this host: the pure decision whether
//! vTPM state found at adoption may be used, from where the state came from
//! (its [`VtpmOrigin`]) and what the migration records say left this host.

use std::path::PathBuf;

use ferry_types::{MigrationId, VmName};
use serde::{Deserialize, Serialize};

use crate::records::{MigrationRecord, MigrationState, Role};

/// Beside a VM's vTPM state: when that vTPM was created (empty, for a new
/// VM or an incoming one), so adoption can tell it from an older copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VtpmOrigin {
    pub created_unix_ms: u64,
}

/// A VM this host migrated away: its vTPM state was erased then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departure {
    pub vm: VmName,
    pub migration: MigrationId,
    pub left_unix_ms: u64,
}

/// Every VM the records say left this host for good (completed as source).
pub fn departures(records: &[MigrationRecord]) -> Vec<Departure> {
    records
        .iter()
        .filter(|r| r.role == Role::Source && r.state() == MigrationState::Completed)
        .map(|r| Departure { vm: r.vm.clone(), migration: r.id, left_unix_ms: r.updated_unix_ms })
        .collect()
}

/// Why vTPM state found at adoption is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaleVtpm {
    #[error(
        "refusing the vTPM state in {dir:?}: VM {vm} left this host in migration {migration} \
         after that vTPM was created, so this is an old copy (a restored backup or snapshot); \
         using it would roll the vTPM back or clone it. Find out where it came from and remove it"
    )]
    MigratedAway { vm: VmName, dir: PathBuf, migration: MigrationId },
    #[error(
        "refusing the vTPM state in {dir:?} of VM {vm}: it does not say when it was created \
         ({file} missing or unreadable), so it may be an old copy. Find out where it came from \
         and remove it"
    )]
    UnknownOrigin { vm: VmName, dir: PathBuf, file: &'static str },
}

impl StaleVtpm {
    pub fn vm(&self) -> &VmName {
        match self {
            StaleVtpm::MigratedAway { vm, .. } | StaleVtpm::UnknownOrigin { vm, .. } => vm,
        }
    }

    pub fn dir(&self) -> &std::path::Path {
        match self {
            StaleVtpm::MigratedAway { dir, .. } | StaleVtpm::UnknownOrigin { dir, .. } => dir,
        }
    }

    pub fn migration(&self) -> Option<MigrationId> {
        match self {
            StaleVtpm::MigratedAway { migration, .. } => Some(*migration),
            StaleVtpm::UnknownOrigin { .. } => None,
        }
    }
}

/// The file a [`VtpmOrigin`] is kept in, in the VM's directory.
pub const ORIGIN_FILE: &str = "vtpm.json";

/// SECURITY: whether the vTPM state of VM `vm` (in `dir`, created at
/// `origin`) may be adopted. A vTPM created before its VM last left this
/// host is a copy of state that was erased when it left (the one live copy
/// is elsewhere); state whose origin is unknown cannot be told from one.
/// A VM started again or migrated back after it left has a newer origin.
pub fn check_adoption(
    vm: &VmName,
    dir: PathBuf,
    origin: Option<VtpmOrigin>,
    departures: &[Departure],
) -> Result<(), StaleVtpm> {
    let Some(origin) = origin else {
        return Err(StaleVtpm::UnknownOrigin { vm: vm.clone(), dir, file: ORIGIN_FILE });
    };
    let last = departures.iter().filter(|d| &d.vm == vm).max_by_key(|d| d.left_unix_ms);
    match last {
        Some(d) if d.left_unix_ms >= origin.created_unix_ms => {
            Err(StaleVtpm::MigratedAway { vm: vm.clone(), dir, migration: d.migration })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_types::HostName;

    fn vm(name: &str) -> VmName {
        name.parse().unwrap()
    }

    fn departure(name: &str, at: u64) -> Departure {
        Departure { vm: vm(name), migration: MigrationId::new(), left_unix_ms: at }
    }

    #[test]
    fn a_vtpm_older_than_its_vms_departure_is_refused() {
        let left = [departure("a", 1_000), departure("b", 5_000), departure("a", 3_000)];
        let check = |name: &str, created: Option<u64>| {
            let origin = created.map(|created_unix_ms| VtpmOrigin { created_unix_ms });
            check_adoption(&vm(name), PathBuf::from("/vms/x"), origin, &left)
        };
        // Created before the last departure: the copy that was erased.
        let err = check("a", Some(2_999)).unwrap_err();
        assert_eq!(err.migration(), Some(left[2].migration), "the latest departure is named");
        assert!(err.to_string().contains("roll the vTPM back or clone it"), "{err}");
        assert!(check("a", Some(3_000)).is_err(), "created in the same ms: not after");
        // Migrated back or started again after it left.
        assert_eq!(check("a", Some(3_001)), Ok(()));
        assert_eq!(check("c", Some(1)), Ok(()), "never left: its own vTPM");
        assert!(check("b", Some(4_000)).is_err());
        let unknown = check("c", None).unwrap_err();
        assert!(matches!(unknown, StaleVtpm::UnknownOrigin { .. }));
        assert!(unknown.to_string().contains(ORIGIN_FILE), "{unknown}");
        assert_eq!(unknown.vm(), &vm("c"));
    }

    #[test]
    fn only_completed_outgoing_migrations_are_departures() {
        let (h1, h2): (HostName, HostName) = ("host1".parse().unwrap(), "host2".parse().unwrap());
        let rec = |role, to| {
            let mut r =
                MigrationRecord::new(MigrationId::new(), role, vm("a"), h1.clone(), h2.clone());
            r.walk_to(to);
            r
        };
        let records = [
            rec(Role::Source, MigrationState::Completed),
            rec(Role::Source, MigrationState::Aborted),
            rec(Role::Source, MigrationState::InDoubt),
            rec(Role::Destination, MigrationState::Completed),
        ];
        let left = departures(&records);
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].migration, records[0].id);
    }
}
