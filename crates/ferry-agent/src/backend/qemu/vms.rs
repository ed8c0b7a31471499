//! The QEMUs this host runs: launched from validated specs, each with its
//! spec and labels persisted beside it so that a restarted agent adopts it
//! again, one shared QMP connection and a console logger.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_policy::VmLabels;
use ferry_types::MigrationId;
use ferry_vmm::{LaunchMode, QemuConfig, QemuProcess, SharedQmp, VmSpec, VmmError};
use tokio::sync::Mutex;

use super::console::{console_logger, CONSOLE_LOG};
use crate::protocol::VmInfo;
use crate::records::write_durably;

pub const SPEC_FILE: &str = "spec.json";
pub const LABELS_FILE: &str = "labels.json";
/// Largest spec file read back.
const MAX_SPEC_FILE: u64 = 64 * 1024;

/// One VM and the single QMP connection the agent keeps to it (QEMU serves
/// one QMP client at a time, so every user goes through this mutex).
pub struct VmEntry {
    pub spec: VmSpec,
    /// Tenant, security level, zones: what policy decides on.
    pub labels: VmLabels,
    pub proc: QemuProcess,
    pub qmp: SharedQmp,
    /// The migration that owns this VM; no other operation may touch it.
    pub busy: Option<MigrationId>,
    console: tokio::task::JoinHandle<()>,
}

impl Drop for VmEntry {
    fn drop(&mut self) {
        self.console.abort();
    }
}

impl VmEntry {
    pub async fn info(&self) -> VmInfo {
        let state = match self.qmp.try_lock() {
            Ok(mut q) => match q.status().await {
                Ok(s) => String::from(s),
                Err(e) => format!("unknown ({e})"),
            },
            Err(_) => "busy".into(),
        };
        VmInfo {
            name: self.spec.name.clone(),
            state,
            pid: self.proc.pid,
            accel: self.proc.accel.qemu_name().to_owned(),
            memory_mib: self.spec.memory_mib,
            vcpus: self.spec.vcpus,
            migration: self.busy,
            console_log: self.proc.dir.join(CONSOLE_LOG).display().to_string(),
        }
    }
}

/// Launch QEMU for `spec`, persist the spec beside it and start its console logger.
pub async fn launch(
    cfg: &QemuConfig,
    spec: &VmSpec,
    labels: &VmLabels,
    mode: LaunchMode,
) -> Result<VmEntry, VmmError> {
    let proc = ferry_vmm::launch(cfg, spec, mode).await?;
    match attach(spec.clone(), labels.clone(), proc.clone(), true).await {
        Ok(entry) => Ok(entry),
        Err(e) => {
            // Never leave a QEMU behind that nobody tracks.
            let _ = tokio::task::spawn_blocking(move || proc.kill()).await;
            Err(e)
        }
    }
}

async fn attach(
    spec: VmSpec,
    labels: VmLabels,
    proc: QemuProcess,
    persist: bool,
) -> Result<VmEntry, VmmError> {
    if persist {
        save_json(&proc.dir.join(SPEC_FILE), &spec)?;
        save_json(&proc.dir.join(LABELS_FILE), &labels)?;
    }
    let console = tokio::spawn(console_logger(proc.serial_path(), proc.dir.join(CONSOLE_LOG)));
    let qmp = proc.qmp().await?;
    Ok(VmEntry { spec, labels, proc, qmp: Arc::new(Mutex::new(qmp)), busy: None, console })
}

fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), VmmError> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| VmmError::Io {
        what: format!("encoding {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    write_durably(path, &body)
        .map_err(|source| VmmError::Io { what: format!("writing {}", path.display()), source })
}

/// Adopt every VM whose QEMU is still alive under `vms_dir`; directories
/// whose QEMU is gone are returned separately for the caller to clean up.
pub async fn adopt_all(vms_dir: &Path) -> Result<(Vec<VmEntry>, Vec<PathBuf>), VmmError> {
    let mut live = Vec::new();
    let mut dead = Vec::new();
    let entries = match std::fs::read_dir(vms_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((live, dead)),
        Err(source) => {
            return Err(VmmError::Io { what: format!("reading {}", vms_dir.display()), source })
        }
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let spec = match read_json::<VmSpec>(&dir.join(SPEC_FILE)) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "VM directory without a usable spec");
                dead.push(dir);
                continue;
            }
        };
        let labels = read_json::<VmLabels>(&dir.join(LABELS_FILE)).unwrap_or_default();
        match ferry_vmm::adopt(&dir).await? {
            Some(proc) => live.push(attach(spec, labels, proc, false).await?),
            None => dead.push(dir),
        }
    }
    Ok((live, dead))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    if len > MAX_SPEC_FILE {
        return Err(format!("{} is {len} bytes", path.display()));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// Kill a VM's QEMU without blocking the runtime.
pub async fn kill(proc: &QemuProcess) -> Result<(), VmmError> {
    let p = proc.clone();
    tokio::task::spawn_blocking(move || p.kill()).await.map_err(|e| VmmError::Io {
        what: "joining the kill task".into(),
        source: std::io::Error::other(e),
    })?
}
