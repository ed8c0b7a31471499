//! Operator requests. One request per connection; a `migrate` with `wait`
//! streams progress until the migration ends. The migration itself runs in
//! its own task, so an operator who disconnects does not abort it.

use std::sync::Arc;
use std::time::Duration;

use ferry_session::MigrationState;
use ferry_types::OperatorName;

use crate::agent::Agent;
use crate::audit::Audit;
use crate::backend::BackendError;
use crate::error::Error;
use crate::net::{Reader, Writer};
use crate::plan::TransferPlan;
use crate::protocol::{ApiRequest, ApiResponse, ErrorKind, HostStatus};
use crate::records::MigrationRecord;
use crate::report::report;
use crate::session::{recover, resolve, source};

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
            let message = format!("malformed request: {}", report(&e));
            let _ = writer
                .write_control(&ApiResponse::Error { kind: ErrorKind::Request, message })
                .await;
            return;
        }
    };
    tracing::info!(%operator, %role, request = request_name(&request), "operator request");
    let result = dispatch(&agent, &operator, &role, request, &mut writer).await;
    let response =
        result.unwrap_or_else(|e| ApiResponse::Error { kind: e.kind(), message: report(&e) });
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
        ApiRequest::VmQmp { .. } => "vm_qmp",
    }
}

fn require_role(
    agent: &Agent,
    operator: &OperatorName,
    role: &str,
    what: &'static str,
) -> Result<(), Error> {
    let allowed = &agent.cfg.migration.operator_roles;
    if allowed.iter().any(|r| r == role) {
        Ok(())
    } else {
        Err(Error::Role {
            operator: operator.to_string(),
            role: role.into(),
            what,
            allowed: allowed.clone(),
        })
    }
}

fn vm_error(agent: &Agent, e: BackendError) -> Error {
    match e {
        BackendError::NoSuchVm(vm) => Error::NoSuchVm { vm, host: agent.host.clone() },
        BackendError::Busy { vm, id } => Error::VmBusy { vm, id },
        BackendError::Exists(vm) => Error::VmExists { vm, host: agent.host.clone() },
        other => Error::Backend(other),
    }
}

async fn dispatch(
    agent: &Arc<Agent>,
    operator: &OperatorName,
    role: &str,
    request: ApiRequest,
    writer: &mut Writer,
) -> Result<ApiResponse, Error> {
    match request {
        ApiRequest::Status => Ok(ApiResponse::Status(HostStatus {
            host: agent.host.clone(),
            backend: agent.backend.name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: crate::protocol::PROTOCOL_VERSION,
            accel: agent.backend.accel().to_owned(),
            vms: agent.backend.count().await,
            peers: agent.cfg.peers.keys().cloned().collect(),
            active_migrations: agent.sessions.in_flight().await,
            checks: crate::preflight::run(&agent.cfg).await,
        })),
        ApiRequest::VmList => Ok(ApiResponse::Vms { vms: agent.backend.list().await }),
        ApiRequest::VmStart { spec, labels } => {
            require_role(agent, operator, role, "start VMs")?;
            let labels = labels.unwrap_or_else(|| ferry_policy::VmLabels {
                tenant: "default".into(),
                ..Default::default()
            });
            if let Some(problem) = labels.problem() {
                return Err(Error::Labels(problem));
            }
            // SECURITY (R3, C6): placed next to the VMs already here (and those
            // arriving) only if no anti-affinity on either side forbids it;
            // decided and launched under the admission lock, so nothing lands
            // in between.
            let _decide = agent.admission_lock.lock().await;
            let here = agent.backend.residents().await;
            let residents = agent.authz.residents(&here);
            let enabled = agent.attestation.enabled();
            if let Err(denied) =
                agent.authz.authorize_start(&agent.host, &spec.name, &labels, residents, enabled)
            {
                agent.metrics.refused("policy");
                let audit = Audit::StartDenied {
                    vm: spec.name.to_string(),
                    operator: operator.to_string(),
                    role: role.to_owned(),
                    reason: report(&denied),
                };
                let _ = agent.notary.record(audit, None, None).await;
                return Err(denied);
            }
            let info = agent.backend.start(&spec, &labels).await.map_err(|e| vm_error(agent, e))?;
            Ok(ApiResponse::Vm(info))
        }
        ApiRequest::VmStop { vm } => {
            require_role(agent, operator, role, "stop VMs")?;
            agent.backend.stop(&vm).await.map_err(|e| vm_error(agent, e))?;
            Ok(ApiResponse::Stopped { vm })
        }
        ApiRequest::Migrate { vm, to, wait, streams, postcopy } => {
            require_role(agent, operator, role, "migrate VMs")?;
            let streams = streams.unwrap_or(agent.cfg.migration.streams.get());
            let plan = TransferPlan::new(streams, postcopy)?;
            let who = source::Requester { operator, role };
            let (id, mut progress, done) = source::start(agent.clone(), vm, to, who, plan).await?;
            if !wait {
                let rec = agent
                    .records
                    .get(&id)?
                    .ok_or(Error::NoSuchMigration { id, host: agent.host.clone() })?;
                return Ok(ApiResponse::Migration(rec));
            }
            let mut done = std::pin::pin!(done);
            let finished = loop {
                tokio::select! {
                    result = &mut done => match result {
                        Ok(f) => break f,
                        Err(e) => return Err(Error::Mismatch(format!("the migration task ended: {e}"))),
                    },
                    changed = progress.changed() => {
                        if changed.is_err() { continue; }
                        let p = progress.borrow_and_update().clone();
                        // The operator may have gone away; the migration goes on regardless.
                        let _ = writer.write_control(&ApiResponse::Progress(p)).await;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            settled(agent, finished).await
        }
        ApiRequest::MigrationList => {
            Ok(ApiResponse::Migrations { migrations: agent.records.all()? })
        }
        ApiRequest::MigrationShow { id } => match agent.records.get(&id)? {
            Some(r) => Ok(ApiResponse::Migration(r)),
            None => Err(Error::NoSuchMigration { id, host: agent.host.clone() }),
        },
        ApiRequest::MigrationCancel { id } => {
            require_role(agent, operator, role, "cancel migrations")?;
            if !agent.sessions.cancel(&id).await {
                let hint = "it is not an outgoing migration in progress (finished, committed, or not ours)";
                let state = agent.records.get(&id)?.map(|r| r.state());
                return Err(match state {
                    Some(state) => Error::WrongState { id, state, hint },
                    None => Error::NoSuchMigration { id, host: agent.host.clone() },
                });
            }
            let rec = agent
                .records
                .get(&id)?
                .ok_or(Error::NoSuchMigration { id, host: agent.host.clone() })?;
            Ok(ApiResponse::Migration(rec))
        }
        ApiRequest::PolicyReload => {
            require_role(agent, operator, role, "reload policy")?;
            agent.reload_policy().await.map(|policies| ApiResponse::PolicyReloaded { policies })
        }
        ApiRequest::MigrationResolve { id } => {
            require_role(agent, operator, role, "resolve migrations")?;
            let rec = resolve::attempt(agent, id).await?;
            outcome(rec)
        }
        ApiRequest::MigrationRecover { id } => {
            require_role(agent, operator, role, "recover migrations")?;
            recover::attempt(agent, id).await.map(ApiResponse::Migration)
        }
        ApiRequest::VmQmp { vm, command, arguments } => {
            vm_qmp(agent, operator, vm, command, arguments).await
        }
    }
}

/// The answer to a finished `migrate`: the record if it completed; if it is
/// in doubt, wait a while for the agent's own resolution first.
async fn settled(agent: &Agent, finished: source::Finished) -> Result<ApiResponse, Error> {
    let source::Finished { record, error } = finished;
    let Some(error) = error else { return Ok(ApiResponse::Migration(record)) };
    if record.state() != MigrationState::InDoubt {
        return match record.state() {
            MigrationState::PostcopyActive => Err(unsettled(&record, error)),
            _ => Err(error),
        };
    }
    // The agent asks the destination at once and then with backoff.
    let deadline = tokio::time::Instant::now() + agent.cfg.migration.resolve_wait();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match agent.records.get(&record.id) {
            Ok(Some(r)) if r.state() == MigrationState::InDoubt => continue,
            Ok(Some(r)) if r.state() == MigrationState::Completed => {
                return Ok(ApiResponse::Migration(r))
            }
            Ok(Some(r)) => {
                let why = r.error.clone().unwrap_or_else(|| r.state().name().to_owned());
                return Err(Error::Resolved {
                    id: r.id,
                    state: r.state(),
                    why,
                    cause: Box::new(error),
                });
            }
            _ => break,
        }
    }
    Err(unsettled(&record, error))
}

/// Still in doubt (or post-copy interrupted): the record says what that
/// means for the VM and what this agent does about it.
fn unsettled(rec: &MigrationRecord, cause: Error) -> Error {
    let note = rec.error.clone().unwrap_or_else(|| report(&cause));
    Error::Unsettled { id: rec.id, state: rec.state(), note }
}

/// A resolve's answer: the record once settled, in-doubt otherwise.
fn outcome(rec: MigrationRecord) -> Result<ApiResponse, Error> {
    match rec.state() {
        MigrationState::InDoubt => {
            let note = rec.error.clone().unwrap_or_default();
            Err(Error::Unsettled { id: rec.id, state: rec.state(), note })
        }
        _ => Ok(ApiResponse::Migration(rec)),
    }
}

/// A read-only QMP command for an operator. Any role may read, as with
/// `vm list`; nothing on the allowlist can change the VM, which is also why
/// a VM held by a migration stays readable: the command takes its turn on
/// the VM's one QMP connection between the migration's own commands.
async fn vm_qmp(
    agent: &Agent,
    operator: &OperatorName,
    vm: ferry_types::VmName,
    command: String,
    arguments: Option<serde_json::Map<String, serde_json::Value>>,
) -> Result<ApiResponse, Error> {
    ferry_vmm::check_read_only(&command).map_err(|e| Error::Denied(e.to_string()))?;
    tracing::info!(%operator, %vm, %command, "QMP diagnostic");
    let args = arguments.map(serde_json::Value::Object);
    let result = agent.backend.diagnose(&vm, &command, args).await.map_err(|e| match e {
        // QEMU's own refusal: an unknown command or bad arguments.
        BackendError::Qemu { source: e @ ferry_vmm::VmmError::Qmp { .. }, .. } => {
            Error::Qmp(e.to_string())
        }
        other => vm_error(agent, other),
    })?;
    // The answer must fit one control frame, with room for its envelope.
    let len = serde_json::to_vec(&result).map_or(usize::MAX, |v| v.len());
    let max = ferry_channel::MAX_CONTROL_LEN as usize - 1024;
    if len > max {
        let why =
            format!("{command}'s answer is {len} bytes; the operator API carries at most {max}");
        return Err(Error::Qmp(why));
    }
    Ok(ApiResponse::Qmp { vm, command, result })
}
