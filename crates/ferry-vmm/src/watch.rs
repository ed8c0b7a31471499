//! Waiting on QEMU's migration from behind the shared QMP handle.
//!
//! QEMU serves one QMP client at a time, so an agent keeps one connection
//! per VM behind a mutex ([`SharedQmp`]) and everyone who waits on a
//! migration polls through it. [`poll_migration`] holds the lock only for
//! each `query-migrate`, so a progress display, a cancel or a post-copy
//! switch can use QMP between two polls.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::qmp::{MigrationState, MigrationStatus, Qmp};
use crate::VmmError;

/// The one QMP connection to a VM, shared by everyone who drives it.
pub type SharedQmp = Arc<Mutex<Qmp>>;

/// What a poll decided about the status it saw.
pub enum Poll<T> {
    /// Stop waiting with this result.
    Done(T),
    /// Ask again after the poll interval.
    Again,
}

/// Poll `query-migrate` until `decide` returns [`Poll::Done`], or fail with
/// [`VmmError::Timeout`] naming the last status after `timeout`. The first
/// polls follow each other after 1 ms, doubling up to `every`: callers wait
/// for a migration that is about to end while the guest is paused, and a
/// full interval would be guest downtime.
pub async fn poll_migration<T>(
    qmp: &Mutex<Qmp>,
    every: Duration,
    timeout: Duration,
    mut decide: impl FnMut(&MigrationStatus) -> Poll<T>,
) -> Result<T, VmmError> {
    let deadline = Instant::now() + timeout;
    let mut pause = FIRST_POLL_GAP.min(every);
    loop {
        let status = qmp.lock().await.query_migrate().await?;
        if let Poll::Done(v) = decide(&status) {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(VmmError::Timeout {
                what: format!("QEMU's migration (last status {:?})", status.status),
                after: timeout,
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(every);
    }
}

const FIRST_POLL_GAP: Duration = Duration::from_millis(1);

/// Wait until QEMU's migration is over: `completed` is Ok, `failed` and
/// `cancelled` are errors. Works on both ends: a destination reports
/// `completed` once it loaded the incoming state.
pub async fn wait_migration_done(
    qmp: &Mutex<Qmp>,
    every: Duration,
    timeout: Duration,
) -> Result<MigrationStatus, VmmError> {
    poll_migration(qmp, every, timeout, |s| match s.status {
        MigrationState::Completed => Poll::Done(Ok(s.clone())),
        MigrationState::Failed => {
            Poll::Done(Err(VmmError::MigrationFailed { desc: s.error_desc.clone() }))
        }
        MigrationState::Cancelled => Poll::Done(Err(VmmError::MigrationCancelled)),
        _ => Poll::Again,
    })
    .await?
}

/// Wait until QEMU's migration reaches a terminal state, whichever it is.
pub async fn wait_migration_terminal(
    qmp: &Mutex<Qmp>,
    every: Duration,
    timeout: Duration,
) -> Result<MigrationStatus, VmmError> {
    poll_migration(qmp, every, timeout, |s| {
        if s.status.is_terminal() {
            Poll::Done(s.clone())
        } else {
            Poll::Again
        }
    })
    .await
}
