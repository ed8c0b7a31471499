//! After a restart (or a crash): adopt the QEMUs that survived and settle
//! every migration that was interrupted, so that each VM runs exactly once.
//!
//! | role        | state when interrupted    | action                                    |
//! |-------------|---------------------------|-------------------------------------------|
//! | source      | preparing, transferring   | cancel QEMU's migration, resume the copy  |
//! | source      | committed, in doubt       | keep the copy paused: in doubt (resolve)  |
//! | destination | preparing, transferring   | kill the incoming QEMU: aborted           |
//! | destination | resuming                  | running → completed, else kill → aborted  |
//! | either      | postcopy_active           | keep both halves; completed once QEMU is  |
//! |             |                           | done, else the source retries recovery    |

use std::sync::Arc;

use ferry_vmm::RunState;

use crate::records::{MigrationRecord, MigrationState, Role};
use crate::{vms, Agent, AgentError};

pub async fn recover(agent: &Arc<Agent>) -> Result<(), AgentError> {
    let (live, dead) = vms::adopt_all(&agent.cfg.vms_dir()).await?;
    for dir in dead {
        tracing::warn!(dir = %dir.display(), "removing the directory of a VM whose QEMU is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
    {
        let mut table = agent.vms.lock().await;
        for entry in live {
            tracing::info!(vm = %entry.spec.name, pid = entry.proc.pid, "adopted running VM");
            table.insert(entry.spec.name.clone(), entry);
        }
    }
    for mut rec in agent.records.all()? {
        if rec.state.is_final() {
            continue;
        }
        let span =
            tracing::info_span!("recovery", migration_id = %rec.id, vm = %rec.vm, role = ?rec.role);
        let _g = span.enter();
        match (rec.role, rec.state) {
            (Role::Source, MigrationState::Committed | MigrationState::InDoubt) => {
                if let Some(e) = agent.vms.lock().await.get_mut(&rec.vm) {
                    e.busy = Some(rec.id);
                }
                rec.state = MigrationState::InDoubt;
                rec.error.get_or_insert_with(|| "agent restarted after commit; ask the destination with `ferry migrations resolve`".into());
                tracing::warn!("migration in doubt after restart; the source copy stays paused");
            }
            (_, MigrationState::PostcopyActive) => {
                let entry =
                    agent.vms.lock().await.get(&rec.vm).map(|e| (e.qmp.clone(), e.proc.clone()));
                let done =
                    crate::postcopy::recover(entry.as_ref().map(|e| e.0.clone()), &mut rec).await;
                match (rec.role, done, entry) {
                    // Every page reached the destination: the source half is spent.
                    (Role::Source, true, Some((qmp, proc))) => {
                        let _ = qmp.lock().await.quit().await;
                        let _ = vms::kill(&proc).await;
                        agent.vms.lock().await.remove(&rec.vm);
                    }
                    (role, false, Some(_)) => {
                        if let Some(e) = agent.vms.lock().await.get_mut(&rec.vm) {
                            e.busy = Some(rec.id);
                        }
                        if role == Role::Source {
                            crate::recover::spawn_auto_recover(agent.clone(), rec.id);
                        }
                    }
                    _ => {}
                }
            }
            (Role::Source, _) => resume_source(agent, &mut rec).await,
            (Role::Destination, MigrationState::Resuming) => settle_resuming(agent, &mut rec).await,
            (Role::Destination, _) => {
                kill_incoming(agent, &rec).await;
                rec.state = MigrationState::Aborted;
                rec.error =
                    Some("destination agent restarted before commit; incoming VM discarded".into());
            }
        }
        agent.records.save(&mut rec)?;
    }
    Ok(())
}

async fn resume_source(agent: &Agent, rec: &mut MigrationRecord) {
    let qmp = agent.vms.lock().await.get(&rec.vm).map(|e| e.qmp.clone());
    rec.state = MigrationState::Aborted;
    let Some(qmp) = qmp else {
        rec.error = Some("source agent restarted before commit, and the VM's QEMU is gone".into());
        tracing::error!("VM lost: its QEMU died while the agent was down");
        return;
    };
    let mut q = qmp.lock().await;
    if let Ok(s) = q.query_migrate().await {
        if !s.status.is_terminal() && s.status != ferry_vmm::MigrationState::None {
            let _ = q.migrate_cancel().await;
            for _ in 0..100 {
                match q.query_migrate().await {
                    Ok(s) if !s.status.is_terminal() => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await
                    }
                    _ => break,
                }
            }
        }
    }
    let resumed = match q.status().await {
        Ok(RunState::Running) => Ok(()),
        Ok(_) => q.cont().await.map_err(|e| crate::chain(&e)),
        Err(e) => Err(crate::chain(&e)),
    };
    rec.error = Some(match resumed {
        Ok(()) => "source agent restarted before commit; the VM runs here again".into(),
        Err(e) => format!("source agent restarted before commit; resuming failed: {e}"),
    });
    tracing::warn!("interrupted outgoing migration rolled back");
}

async fn kill_incoming(agent: &Agent, rec: &MigrationRecord) {
    let entry = agent.vms.lock().await.remove(&rec.vm);
    if let Some(entry) = entry {
        tracing::warn!(pid = entry.proc.pid, "killing orphaned incoming QEMU");
        if let Err(e) = vms::kill(&entry.proc).await {
            tracing::error!(error = %crate::chain(&e), "cannot kill orphaned QEMU");
        }
        let _ = std::fs::remove_dir_all(&entry.proc.dir);
    }
}

async fn settle_resuming(agent: &Agent, rec: &mut MigrationRecord) {
    let qmp = agent.vms.lock().await.get(&rec.vm).map(|e| e.qmp.clone());
    let running = match qmp {
        Some(q) => matches!(q.lock().await.status().await, Ok(RunState::Running)),
        None => false,
    };
    if running {
        rec.state = MigrationState::Completed;
        if let Some(e) = agent.vms.lock().await.get_mut(&rec.vm) {
            e.busy = None;
        }
    } else {
        kill_incoming(agent, rec).await;
        rec.state = MigrationState::Aborted;
        rec.error =
            Some("destination agent restarted before resuming; incoming VM discarded".into());
    }
}
