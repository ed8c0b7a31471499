//! A VM's virtual TPM: its own swtpm (TPM 2.0), started before its QEMU
//! and stopped after it, with its state in `vtpm/` (mode 0700) inside the
//! VM's directory. QEMU's tpm-emulator backend carries the state inside
//! the migration stream, so the state never travels any other way.
//!
//! swtpm runs detached (`--daemon`) like QEMU, so a vTPM outlives an agent
//! restart, and with `--terminate`: it exits when QEMU closes the control
//! connection, so a vTPM never outlives its VM.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::owned;
use crate::VmmError;

/// The vTPM's state directory inside the VM's directory.
pub const STATE_DIR: &str = "vtpm";
/// swtpm's control socket, which QEMU connects to.
pub const CTRL_SOCK: &str = "vtpm.sock";
const PID_FILE: &str = "swtpm.pid";
const LOG_FILE: &str = "swtpm.log";
/// swtpm listens within milliseconds; a loaded host gets ample slack.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running swtpm serving one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swtpm {
    pub pid: u32,
    /// The VM's directory.
    pub dir: PathBuf,
}

impl Swtpm {
    /// Alive (not a zombie) and still the swtpm of this directory.
    pub fn is_alive(&self) -> bool {
        owned_swtpm(self.pid, &self.dir)
    }

    /// Stop swtpm (normally it has already exited with its QEMU). Blocks
    /// for at most a few seconds; stopping a dead swtpm is not an error.
    pub fn kill(&self) -> Result<(), VmmError> {
        owned::stop(self.pid, "swtpm", || self.is_alive())?;
        for f in [CTRL_SOCK, PID_FILE] {
            owned::remove_if_exists(&self.dir.join(f))?;
        }
        Ok(())
    }
}

fn owned_swtpm(pid: u32, dir: &Path) -> bool {
    let want = owned::prefixed("file=", &dir.join(PID_FILE));
    owned::live_args(pid, |args| owned::has_arg_pair(args, "--pid", &want)).is_some()
}

/// The state directory of the VM whose directory is `dir`.
pub fn state_dir(dir: &Path) -> PathBuf {
    dir.join(STATE_DIR)
}

/// The VM directory `dir` holds vTPM state (any entry in its state directory).
pub fn has_state(dir: &Path) -> bool {
    std::fs::read_dir(state_dir(dir)).is_ok_and(|mut entries| entries.next().is_some())
}

/// Start a fresh swtpm for the VM whose directory is `dir`, before its
/// QEMU. SECURITY: refuses a state directory that holds anything: a VM's
/// vTPM is created empty (a new VM) or filled only by its migration stream
/// (an incoming one), never taken from a file that was lying here, which
/// could be a copy of a vTPM that lives on elsewhere, or an older one.
pub async fn start(binary: &Path, dir: &Path) -> Result<Swtpm, VmmError> {
    let state = state_dir(dir);
    if has_state(dir) {
        return Err(VmmError::VtpmStateExists { path: state });
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&state)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))
            }
            _ => Err(e),
        })
        .map_err(|e| VmmError::io(format!("creating {state:?}"), e))?;
    for f in [CTRL_SOCK, PID_FILE] {
        owned::remove_if_exists(&dir.join(f))?;
    }
    let arg = |prefix: &str, path: &Path, suffix: &str| {
        let mut s = std::ffi::OsString::from(prefix);
        s.push(path);
        s.push(suffix);
        s
    };
    let log = dir.join(LOG_FILE);
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(["socket", "--tpm2", "--tpmstate"])
        .arg(arg("dir=", &state, ",mode=0600"))
        .arg("--ctrl")
        .arg(arg("type=unixio,path=", &dir.join(CTRL_SOCK), ",mode=0600"))
        .arg("--pid")
        .arg(arg("file=", &dir.join(PID_FILE), ""))
        .arg("--log")
        .arg(arg("file=", &log, ",level=1"))
        .args(["--terminate", "--daemon"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    tracing::debug!(?cmd, "starting swtpm");
    let out = cmd.output();
    let out = match tokio::time::timeout(START_TIMEOUT, out).await {
        Ok(out) => out.map_err(|e| VmmError::io(format!("spawning {binary:?}"), e))?,
        Err(_) => {
            return Err(VmmError::Timeout {
                what: "swtpm to daemonize".into(),
                after: START_TIMEOUT,
            })
        }
    };
    if !out.status.success() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        let why = format!("{}\n{log}", String::from_utf8_lossy(&out.stderr));
        return Err(VmmError::SwtpmFailed {
            status: out.status.to_string(),
            stderr: why.trim().chars().take(4096).collect(),
        });
    }
    wait_listening(dir).await
}

/// The daemon's pid and its control socket, once both exist.
async fn wait_listening(dir: &Path) -> Result<Swtpm, VmmError> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let pid = owned::read_pid(&dir.join(PID_FILE))?;
        match pid {
            Some(pid) if dir.join(CTRL_SOCK).exists() => {
                let swtpm = Swtpm { pid, dir: dir.to_owned() };
                if swtpm.is_alive() {
                    return Ok(swtpm);
                }
                return Err(VmmError::SwtpmFailed {
                    status: format!("daemon pid {pid} exited right after start"),
                    stderr: std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default(),
                });
            }
            _ if Instant::now() > deadline => {
                return Err(VmmError::Timeout {
                    what: "swtpm's control socket".into(),
                    after: START_TIMEOUT,
                })
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// After an agent restart: the swtpm of the VM directory `dir`, if alive.
pub fn adopt(dir: &Path) -> Result<Option<Swtpm>, VmmError> {
    let Some(pid) = owned::read_pid(&dir.join(PID_FILE))? else {
        return Ok(None);
    };
    let swtpm = Swtpm { pid, dir: dir.to_owned() };
    Ok(swtpm.is_alive().then_some(swtpm))
}

/// What [`erase`] destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Erased {
    pub files: u64,
    pub bytes: u64,
}

/// SECURITY: destroy the vTPM state of the VM directory `dir`: every file's
/// contents overwritten with zeros and flushed to the disk, then unlinked,
/// then the directory removed and its parent flushed. On a filesystem that
/// writes in place this leaves nothing to read back; on copy-on-write
/// filesystems, SSDs and snapshots older blocks may survive (docs/vtpm.md).
/// swtpm must be stopped first. Ok(None): there was no state.
pub fn erase(dir: &Path) -> Result<Option<Erased>, VmmError> {
    erase_state(&state_dir(dir), dir)
}

/// [`erase`] for a state directory `state` kept elsewhere than in a VM
/// directory (libvirt keeps a domain's in its own swtpm directory), whose
/// entry in `parent` is flushed after.
pub fn erase_state(state: &Path, parent: &Path) -> Result<Option<Erased>, VmmError> {
    match std::fs::symlink_metadata(state) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VmmError::io(format!("inspecting {state:?}"), e)),
        Ok(m) if !m.is_dir() => {
            // Never follow a link planted where the state should be.
            owned::remove_if_exists(state)?;
            return Ok(Some(Erased::default()));
        }
        Ok(_) => {}
    }
    let mut erased = Erased::default();
    erase_dir(state, &mut erased)?;
    sync_dir(parent)?;
    Ok(Some(erased))
}

fn erase_dir(dir: &Path, erased: &mut Erased) -> Result<(), VmmError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| VmmError::io(format!("reading {dir:?}"), e))?;
    for entry in entries {
        let path = entry.map_err(|e| VmmError::io(format!("reading {dir:?}"), e))?.path();
        let meta = std::fs::symlink_metadata(&path)
            .map_err(|e| VmmError::io(format!("inspecting {path:?}"), e))?;
        if meta.is_dir() {
            erase_dir(&path, erased)?;
            continue;
        }
        if meta.is_file() {
            overwrite(&path, meta.len())?;
            erased.bytes += meta.len();
        }
        owned::remove_if_exists(&path)?;
        erased.files += 1;
    }
    std::fs::remove_dir(dir).map_err(|e| VmmError::io(format!("removing {dir:?}"), e))
}

fn overwrite(path: &Path, len: u64) -> Result<(), VmmError> {
    let io = |e| VmmError::io(format!("overwriting {path:?}"), e);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).map_err(io)?;
    let zeros = [0u8; 8192];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n]).map_err(io)?;
        left -= n as u64;
    }
    f.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), VmmError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VmmError::io(format!("flushing {dir:?}"), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn erase_overwrites_then_removes_everything() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(erase(dir.path()).unwrap(), None, "no state, nothing erased");
        let state = state_dir(dir.path());
        std::fs::create_dir(&state).unwrap();
        assert!(!has_state(dir.path()), "an empty state directory is no state");
        std::fs::write(state.join("tpm2-00.permall"), vec![0xA5u8; 20_000]).unwrap();
        std::fs::write(state.join(".lock"), b"").unwrap();
        std::fs::create_dir(state.join("sub")).unwrap();
        std::fs::write(state.join("sub").join("x"), b"secret").unwrap();
        assert!(has_state(dir.path()));
        // Keep the inode alive to read what is left in it after the erase.
        let permall = std::fs::File::open(state.join("tpm2-00.permall")).unwrap();
        let ino = permall.metadata().unwrap().ino();
        let erased = erase(dir.path()).unwrap().unwrap();
        assert_eq!(erased, Erased { files: 3, bytes: 20_006 });
        assert!(!state.exists() && !has_state(dir.path()));
        let mut left = Vec::new();
        std::io::Read::read_to_end(&mut &permall, &mut left).unwrap();
        assert_eq!(permall.metadata().unwrap().ino(), ino);
        assert_eq!(left.len(), 20_000);
        assert!(left.iter().all(|&b| b == 0), "the contents were overwritten before the unlink");
    }

    #[test]
    fn erase_never_follows_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), b"not ours").unwrap();
        std::os::unix::fs::symlink(&elsewhere, state_dir(dir.path())).unwrap();
        assert!(erase(dir.path()).unwrap().is_some());
        assert_eq!(std::fs::read(elsewhere.join("keep")).unwrap(), b"not ours");
        assert!(std::fs::symlink_metadata(state_dir(dir.path())).is_err());
    }

    #[tokio::test]
    async fn start_refuses_existing_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(state_dir(dir.path())).unwrap();
        std::fs::write(state_dir(dir.path()).join("tpm2-00.permall"), b"old").unwrap();
        let err = start(Path::new("/nonexistent/swtpm"), dir.path()).await.unwrap_err();
        assert!(matches!(err, VmmError::VtpmStateExists { .. }), "{err}");
        assert!(err.to_string().contains("never reuses"), "{err}");
    }
}
