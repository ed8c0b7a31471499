//! QEMU's post-copy. Migrations start in pre-copy and switch only once
//! pre-copy shows it will not converge ([`switch_reason`]); after the link
//! breaks, both QEMUs wait in `postcopy-paused` until the stream resumes.

use std::time::Duration;

use async_trait::async_trait;
use ferry_types::VmName;
use ferry_vmm::{MigrationState, Poll, RamStats, RunState};
use tokio::net::{UnixListener, UnixStream};

use super::{destination, QemuBackend};
use crate::backend::{BackendError, PostcopyBackend, SwitchState};

/// Pre-copy passes after which the switch happens whatever the rates say:
/// a guest that needs more has kept its migration running for long enough.
const MAX_PRECOPY_PASSES: u64 = 8;
/// How long a QEMU may take to notice the broken link and pause.
const PAUSE_WAIT: Duration = Duration::from_secs(15);
const RESUME_WAIT: Duration = Duration::from_secs(10);
/// How long a stopped source may take to say `postcopy-active`.
const SWITCH_SETTLE: Duration = Duration::from_secs(2);
/// Long enough for any migration that is still worth switching.
const SWITCH_WATCH: Duration = Duration::from_secs(24 * 3600);

/// What the source's QEMU says about the switch; None while it is between
/// states: QEMU stops the VM and sends the switchover package before it
/// says `postcopy-active`, so the destination can report ready first.
///
/// SECURITY: `Switched` (the destination may run the VM) needs
/// `postcopy-active` with the VM not running here.
fn switch_state(status: &MigrationState, run: &RunState) -> Option<SwitchState> {
    match (status, run) {
        (MigrationState::Completed, _) => Some(SwitchState::Completed),
        (MigrationState::PostcopyActive, run) if *run != RunState::Running => {
            Some(SwitchState::Switched)
        }
        (MigrationState::Active, RunState::FinishMigrate) => None,
        (status, run) => Some(SwitchState::Not(format!("{status:?}, {run:?}"))),
    }
}

/// Why pre-copy should give way to post-copy now, if it should. Only after
/// the first pass (QEMU knows the dirty rate from its second bitmap sync
/// on): when the guest dirties memory at least half as fast as the link
/// carries it, pre-copy's remaining work shrinks too slowly to converge.
pub(crate) fn switch_reason(ram: &RamStats) -> Option<String> {
    if ram.dirty_sync_count < 2 {
        return None;
    }
    let page = if ram.page_size == 0 { 4096 } else { ram.page_size };
    let dirty = ram.dirty_pages_rate.saturating_mul(page) as f64;
    let link = ram.mbps * 1e6 / 8.0;
    if link > 0.0 && dirty * 2.0 >= link {
        return Some(format!(
            "the guest dirties {:.0} MB/s; the link carries {:.0} MB/s",
            dirty / 1e6,
            link / 1e6
        ));
    }
    if ram.dirty_sync_count > MAX_PRECOPY_PASSES {
        return Some(format!(
            "pre-copy is still running after {} passes",
            ram.dirty_sync_count - 1
        ));
    }
    None
}

#[async_trait]
impl PostcopyBackend for QemuBackend {
    async fn switch_when_behind(&self, vm: &VmName) {
        let Ok(qmp) = self.qmp(vm).await else { return };
        let every = Duration::from_millis(50);
        let why = ferry_vmm::poll_migration(&qmp, every, SWITCH_WATCH, |s| match s.status {
            MigrationState::Setup => Poll::Again,
            MigrationState::Active => match s.ram.as_ref().and_then(switch_reason) {
                Some(why) => Poll::Done(Some(why)),
                None => Poll::Again,
            },
            _ => Poll::Done(None),
        });
        let Ok(Some(why)) = why.await else { return };
        let switched = qmp.lock().await.execute("migrate-start-postcopy", None).await;
        match switched {
            Ok(_) => tracing::info!(reason = %why, "switching to post-copy"),
            Err(e) => tracing::warn!(error = %e, "QEMU refused to start post-copy"),
        }
    }

    async fn switch_state(&self, vm: &VmName) -> Result<SwitchState, BackendError> {
        let qmp = self.qmp(vm).await?;
        let settle = tokio::time::Instant::now() + SWITCH_SETTLE;
        loop {
            let mut q = qmp.lock().await;
            let status = q.query_migrate().await.map_err(BackendError::qemu("query-migrate"))?;
            let run = q.status().await.map_err(BackendError::qemu("query-status"))?;
            drop(q);
            match switch_state(&status.status, &run) {
                Some(known) => return Ok(known),
                None if tokio::time::Instant::now() >= settle => {
                    return Ok(SwitchState::Not(format!("{:?}, {:?}", status.status, run)))
                }
                None => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_switchover(&self, vm: &VmName) -> Result<bool, BackendError> {
        let qmp = self.qmp(vm).await?;
        let every = Duration::from_millis(5);
        loop {
            let state = ferry_vmm::poll_migration(&qmp, every, SWITCH_WATCH, |s| match &s.status {
                MigrationState::PostcopyActive => Poll::Done(true),
                st if st.is_terminal() => Poll::Done(false),
                _ => Poll::Again,
            });
            if !state.await.map_err(BackendError::qemu("query-migrate"))? {
                return Ok(false);
            }
            // Started with -S: QEMU holds the package, paused, until we cont.
            if matches!(qmp.lock().await.status().await, Ok(RunState::Paused)) {
                return Ok(true);
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn wait_paused(&self, vm: &VmName) -> Result<bool, BackendError> {
        let qmp = self.qmp(vm).await?;
        let every = Duration::from_millis(50);
        ferry_vmm::poll_migration(&qmp, every, PAUSE_WAIT, |s| match s.status {
            MigrationState::PostcopyPaused => Poll::Done(true),
            MigrationState::Completed => Poll::Done(false),
            _ => Poll::Again,
        })
        .await
        .map_err(BackendError::qemu("waiting for QEMU to pause its post-copy"))
    }

    async fn resume_out(&self, vm: &VmName) -> Result<UnixStream, BackendError> {
        let (qmp, dir) = (self.qmp(vm).await?, self.dir(vm).await?);
        let sock = dir.join("recover-out.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(|source| BackendError::Io {
            what: "listening for QEMU's resumed stream".into(),
            source,
        })?;
        let uri = format!("unix:{}", sock.display());
        let resumed = qmp.lock().await.migrate_resume(&uri).await;
        resumed.map_err(BackendError::qemu("resuming QEMU's post-copy"))?;
        let accepted = tokio::time::timeout(RESUME_WAIT, listener.accept()).await;
        let _ = std::fs::remove_file(&sock);
        match accepted {
            Ok(Ok((s, _))) => Ok(s),
            Ok(Err(source)) => {
                Err(BackendError::Io { what: "accepting QEMU's resumed stream".into(), source })
            }
            Err(_) => Err(BackendError::NoConnection {
                what: "resumed stream".into(),
                after: RESUME_WAIT,
            }),
        }
    }

    async fn listen_again(&self, vm: &VmName) -> Result<UnixStream, BackendError> {
        let (qmp, dir) = (self.qmp(vm).await?, self.dir(vm).await?);
        let sock = dir.join("recover.sock");
        let _ = std::fs::remove_file(&sock);
        let uri = format!("unix:{}", sock.display());
        let listening = qmp.lock().await.migrate_recover(&uri).await;
        listening.map_err(BackendError::qemu("listening again for the resumed stream"))?;
        destination::connect_retry(&sock).await
    }

    async fn alive(&self, vm: &VmName) -> bool {
        self.vms.lock().await.get(vm).is_some_and(|e| e.proc.is_alive())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(passes: u64, dirty_pages_per_s: u64, mbps: f64) -> RamStats {
        RamStats {
            dirty_sync_count: passes,
            dirty_pages_rate: dirty_pages_per_s,
            mbps,
            page_size: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_stopped_postcopy_source_is_switched_and_finish_migrate_waits() {
        use MigrationState::{Active, Completed, PostcopyActive};
        let st = |m, r| switch_state(&m, &r).map(|s| format!("{s:?}"));
        assert_eq!(st(PostcopyActive, RunState::FinishMigrate).as_deref(), Some("Switched"));
        assert_eq!(st(PostcopyActive, RunState::PostMigrate).as_deref(), Some("Switched"));
        assert!(st(PostcopyActive, RunState::Running).unwrap().starts_with("Not"));
        assert_eq!(st(Completed, RunState::Running).as_deref(), Some("Completed"));
        assert_eq!(st(Active, RunState::FinishMigrate), None, "stopped, not yet switched: wait");
        assert!(st(Active, RunState::Running).unwrap().starts_with("Not"));
    }

    #[test]
    fn switches_only_when_precopy_falls_behind() {
        // During the first pass nothing is known yet.
        assert_eq!(switch_reason(&ram(1, 1_000_000, 800.0)), None);
        // 256 pages/ms = 1 GB/s against a 100 MiB/s link: switch.
        let why = switch_reason(&ram(2, 256_000, 838.9)).expect("switch");
        assert!(why.contains("1049 MB/s") && why.contains("105 MB/s"), "{why}");
        // 64 pages/ms = 262 MB/s against ~800 MB/s: pre-copy converges.
        assert_eq!(switch_reason(&ram(3, 64_000, 6400.0)), None);
        // An idle guest, or a rate QEMU has not measured yet.
        assert_eq!(switch_reason(&ram(2, 0, 6400.0)), None);
        assert_eq!(switch_reason(&ram(2, 0, 0.0)), None);
        // However slow the guest, pre-copy does not run forever.
        let why = switch_reason(&ram(MAX_PRECOPY_PASSES + 1, 10, 6400.0)).expect("switch");
        assert!(why.contains("8 passes"), "{why}");
    }
}
