//! Operator requests. One request per connection; a `migrate` with `wait`
//! streams progress until the migration ends. The migration itself runs in
//! its own task, so an operator who disconnects does not abort it.

use std::sync::Arc;
use std::time::Duration;

use ferry_types::OperatorName;
use ferry_vmm::LaunchMode;

use crate::protocol::{ApiRequest, ApiResponse, ErrorKind, HostStatus};
use crate::server::{Reader, Writer};
use crate::{outgoing, vms, Agent, Fault};

pub async fn handle(
    agent: Arc<Agent>,
    operator: OperatorName,
    role: String,
    mut reader: Reader,
    mut writer: Writer,
) {
    let request: ApiRequest = match reader.read_control().await {
        Ok(r) => r,
        Err(e) => {
            let message = format!("malformed request: {}", crate::chain(&e));
            let _ = writer
                .write_control(&ApiResponse::Error { kind: ErrorKind::Request, message })
                .await;
            return;
        }
    };
    tracing::info!(%operator, %role, request = ?request_name(&request), "operator request");
    let result = dispatch(&agent, &operator, &role, request, &mut writer).await;
    let response =
        result.unwrap_or_else(|f| ApiResponse::Error { kind: f.kind, message: f.message });
    let _ = writer.write_control(&response).await;
}

fn request_name(r: &ApiRequest) -> &'static str {
    match r {
        ApiRequest::Status => "status",
        ApiRequest::VmStart { .. } => "vm_start",
        ApiRequest::VmList => "vm_list",
        ApiRequest::VmStop { .. } => "vm_stop",
        ApiRequest::Migrate { .. } => "migrate",
        ApiRequest::MigrationList => "migration_list",
        ApiRequest::MigrationShow { .. } => "migration_show",
        ApiRequest::MigrationResolve { .. } => "migration_resolve",
        ApiRequest::PolicyReload => "policy_reload",
        ApiRequest::MigrationCancel { .. } => "migration_cancel",
        ApiRequest::MigrationRecover { .. } => "migration_recover",
    }
}

fn require_role(
    agent: &Agent,
    operator: &OperatorName,
    role: &str,
    what: &str,
) -> Result<(), Fault> {
    if agent.cfg.migration.operator_roles.iter().any(|r| r == role) {
        Ok(())
    } else {
        Err(Fault::new(
            ErrorKind::Denied,
            format!(
                "operator {operator} (role {role}) may not {what}: allowed roles are {:?}",
                agent.cfg.migration.operator_roles
            ),
        ))
    }
}

async fn dispatch(
    agent: &Arc<Agent>,
    operator: &OperatorName,
    role: &str,
    request: ApiRequest,
    writer: &mut Writer,
) -> Result<ApiResponse, Fault> {
    match request {
        ApiRequest::Status => Ok(ApiResponse::Status(HostStatus {
            host: agent.host.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: crate::protocol::PROTOCOL_VERSION,
            accel: agent.accel.qemu_name().to_owned(),
            vms: agent.vms.lock().await.len(),
            peers: agent.cfg.peers.keys().cloned().collect(),
            active_migrations: agent.active.lock().await.len(),
        })),
        ApiRequest::VmList => {
            let vms = agent.vms.lock().await;
            let mut out = Vec::with_capacity(vms.len());
            for entry in vms.values() {
                out.push(entry.info().await);
            }
            Ok(ApiResponse::Vms { vms: out })
        }
        ApiRequest::VmStart { spec, labels } => {
            require_role(agent, operator, role, "start VMs")?;
            let labels = labels.unwrap_or_else(|| ferry_policy::VmLabels {
                tenant: "default".into(),
                ..Default::default()
            });
            if let Some(problem) = labels.problem() {
                return Err(Fault::new(ErrorKind::Request, format!("VM labels: {problem}")));
            }
            let mut table = agent.vms.lock().await;
            if table.contains_key(&spec.name) {
                return Err(Fault::new(
                    ErrorKind::Request,
                    format!("VM {} already exists on {}", spec.name, agent.host),
                ));
            }
            // SECURITY (R3, C6): placed next to the VMs already here (and those
            // arriving) only if no anti-affinity on either side forbids it;
            // decided and launched under the table lock, so nothing lands in
            // between.
            let residents = agent.authz.residents(&table);
            let enabled = agent.attestation.enabled();
            if let Err(denied) =
                agent.authz.authorize_start(&agent.host, &spec.name, &labels, residents, enabled)
            {
                agent.metrics.refused("policy");
                let mut ev = ferry_audit::AuditEvent::new("start_denied");
                ev.vm = Some(spec.name.to_string());
                ev.detail = serde_json::json!({
                    "operator": operator,
                    "role": role,
                    "reason": denied.message,
                });
                let _ = agent.audit(ev).await;
                return Err(denied);
            }
            let entry =
                vms::launch(&agent.qemu, &spec, &labels, LaunchMode::Run).await.map_err(|e| {
                    Fault::new(
                        ErrorKind::Backend,
                        format!("cannot start VM {}: {}", spec.name, crate::chain(&e)),
                    )
                })?;
            let info = entry.info().await;
            table.insert(spec.name.clone(), entry);
            Ok(ApiResponse::Vm(info))
        }
        ApiRequest::VmStop { vm } => {
            require_role(agent, operator, role, "stop VMs")?;
            let mut table = agent.vms.lock().await;
            let entry = table.get(&vm).ok_or_else(|| {
                Fault::new(ErrorKind::Request, format!("no VM {vm} on {}", agent.host))
            })?;
            if let Some(id) = entry.busy {
                return Err(Fault::new(
                    ErrorKind::Request,
                    format!("VM {vm} is held by migration {id}"),
                ));
            }
            vms::kill(&entry.proc).await.map_err(|e| {
                Fault::new(ErrorKind::Backend, format!("cannot stop VM {vm}: {}", crate::chain(&e)))
            })?;
            let _ = std::fs::remove_dir_all(&entry.proc.dir);
            table.remove(&vm);
            Ok(ApiResponse::Stopped { vm })
        }
        ApiRequest::Migrate { vm, to, wait, streams, postcopy } => {
            require_role(agent, operator, role, "migrate VMs")?;
            let streams = streams.unwrap_or(agent.cfg.migration.streams);
            if streams == 0 || streams > crate::streams::MAX_STREAMS {
                return Err(Fault::new(
                    ErrorKind::Request,
                    format!("streams must be 1..={}", crate::streams::MAX_STREAMS),
                ));
            }
            if postcopy && streams > 1 {
                return Err(Fault::new(
                    ErrorKind::Request,
                    crate::postcopy::WITH_MULTIFD.to_owned(),
                ));
            }
            let (id, mut progress, done) =
                outgoing::start(agent.clone(), vm, to, operator, role, streams, postcopy).await?;
            if !wait {
                let rec = agent.records.get(&id).ok().flatten();
                return rec
                    .map(ApiResponse::Migration)
                    .ok_or_else(|| Fault::new(ErrorKind::Backend, "record missing"));
            }
            let mut done = std::pin::pin!(done);
            loop {
                tokio::select! {
                    result = &mut done => {
                        return match result {
                            Ok(Ok(rec)) => Ok(ApiResponse::Migration(rec)),
                            Ok(Err(fault)) => Err(fault),
                            Err(_) => Err(Fault::new(ErrorKind::Backend, "migration task ended unexpectedly")),
                        };
                    }
                    changed = progress.changed() => {
                        if changed.is_err() { continue; }
                        let p = progress.borrow_and_update().clone();
                        // The operator may have gone away; the migration goes on regardless.
                        let _ = writer.write_control(&ApiResponse::Progress(p)).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
        ApiRequest::MigrationList => {
            let migrations = agent
                .records
                .all()
                .map_err(|e| Fault::new(ErrorKind::Backend, crate::chain(&e)))?;
            Ok(ApiResponse::Migrations { migrations })
        }
        ApiRequest::MigrationShow { id } => match agent.records.get(&id) {
            Ok(Some(r)) => Ok(ApiResponse::Migration(r)),
            Ok(None) => {
                Err(Fault::new(ErrorKind::Request, format!("no migration {id} on {}", agent.host)))
            }
            Err(e) => Err(Fault::new(ErrorKind::Backend, crate::chain(&e))),
        },
        ApiRequest::MigrationCancel { id } => {
            require_role(agent, operator, role, "cancel migrations")?;
            let switch = agent.cancels.lock().await.remove(&id);
            match switch {
                Some(tx) => {
                    let _ = tx.send(true);
                    match agent.records.get(&id) {
                        Ok(Some(r)) => Ok(ApiResponse::Migration(r)),
                        _ => Err(Fault::new(ErrorKind::Backend, "record missing")),
                    }
                }
                None => Err(Fault::new(
                    ErrorKind::Request,
                    format!("migration {id} is not an outgoing migration in progress on {} (finished, committed, or not ours)", agent.host),
                )),
            }
        }
        ApiRequest::PolicyReload => {
            require_role(agent, operator, role, "reload policy")?;
            agent.reload_policy().await.map(|policies| ApiResponse::PolicyReloaded { policies })
        }
        ApiRequest::MigrationResolve { id } => {
            require_role(agent, operator, role, "resolve migrations")?;
            crate::resolve::resolve(agent, id).await.map(ApiResponse::Migration)
        }
        ApiRequest::MigrationRecover { id } => {
            require_role(agent, operator, role, "recover migrations")?;
            crate::recover::recover(agent, id).await.map(ApiResponse::Migration)
        }
    }
}
