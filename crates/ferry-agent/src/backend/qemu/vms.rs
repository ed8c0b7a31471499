//! The QEMUs this host runs: launched from validated specs, each with its
//! spec and labels persisted beside it so that a restarted agent adopts it
//! again, one shared QMP connection and a console logger.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_policy::VmLabels;
use ferry_types::MigrationId;
use ferry_vmm::{swtpm, Erased, LaunchMode, QemuConfig, QemuProcess, SharedQmp, VmSpec, VmmError};
use tokio::sync::Mutex;

use super::console::{ConsoleLogger, CONSOLE_LOG};
use crate::protocol::VmInfo;
use crate::records::write_durably;
use crate::vtpm::{check_adoption, Departure, StaleVtpm, VtpmOrigin, ORIGIN_FILE};

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
    /// Stops with the entry.
    _console: ConsoleLogger,
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
            tpm: self.spec.tpm,
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
    let attached = async {
        if !spec.tpm.is_none() {
            // Its swtpm just made it empty: this is when the vTPM began.
            let origin = VtpmOrigin { created_unix_ms: crate::records::now_unix_ms() };
            save_json(&proc.dir.join(ORIGIN_FILE), &origin)?;
        }
        attach(spec.clone(), labels.clone(), proc.clone(), true).await
    };
    match attached.await {
        Ok(entry) => Ok(entry),
        Err(e) => {
            // Never leave a QEMU behind that nobody tracks, nor its fresh
            // vTPM state (which would block the next launch of this name).
            let _ = tokio::task::spawn_blocking(move || {
                proc.kill().and_then(|()| swtpm::erase(&proc.dir))
            })
            .await;
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
    let console = ConsoleLogger::start(proc.serial_path(), proc.dir.join(CONSOLE_LOG));
    let qmp = proc.qmp().await?;
    let qmp = Arc::new(Mutex::new(qmp));
    Ok(VmEntry { spec, labels, proc, qmp, busy: None, _console: console })
}

fn save_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), VmmError> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| VmmError::Io {
        what: format!("encoding {}", path.display()),
        source: std::io::Error::other(e),
    })?;
    write_durably(path, &body)
        .map_err(|source| VmmError::Io { what: format!("writing {}", path.display()), source })
}

/// What [`adopt_all`] found under the VMs' directory.
#[derive(Default)]
pub struct Found {
    pub live: Vec<VmEntry>,
    /// Directories whose QEMU is gone, for the caller to clean up.
    pub dead: Vec<PathBuf>,
    /// Directories whose vTPM state must not be used: left alone.
    pub refused: Vec<StaleVtpm>,
}

/// Adopt every VM whose QEMU is still alive under `vms_dir`, unless its
/// vTPM state is stale ([`check_adoption`]).
pub async fn adopt_all(vms_dir: &Path, departures: &[Departure]) -> Result<Found, VmmError> {
    let mut found = Found::default();
    let entries = match std::fs::read_dir(vms_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
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
                found.dead.push(dir);
                continue;
            }
        };
        // SECURITY: checked before anything else looks at the directory,
        // so stale vTPM state is neither used nor removed as a dead VM's.
        if swtpm::has_state(&dir) {
            let origin = read_json::<VtpmOrigin>(&dir.join(ORIGIN_FILE)).ok();
            if let Err(stale) = check_adoption(&spec.name, dir.clone(), origin, departures) {
                found.refused.push(stale);
                continue;
            }
        }
        let labels = read_json::<VmLabels>(&dir.join(LABELS_FILE)).unwrap_or_default();
        match ferry_vmm::adopt(&dir).await? {
            Some(proc) => found.live.push(attach(spec, labels, proc, false).await?),
            None => found.dead.push(dir),
        }
    }
    Ok(found)
}

/// Remove a VM's directory, its vTPM state erased first (docs/vtpm.md).
pub async fn remove_dir(dir: &Path) -> Result<Option<Erased>, VmmError> {
    let d = dir.to_owned();
    let erased = tokio::task::spawn_blocking(move || swtpm::erase(&d)).await.map_err(|e| {
        VmmError::Io { what: "joining the erase task".into(), source: std::io::Error::other(e) }
    })??;
    let _ = std::fs::remove_dir_all(dir);
    Ok(erased)
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
