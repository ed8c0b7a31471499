//! Launching, adopting and killing detached QEMU processes.
//!
//! QEMU runs with `-daemonize`, so it is re-parented away from the agent and
//! a crashed or restarted agent does not take its VMs down. Each VM owns one
//! directory, `run_dir/NAME/`, holding `qmp.sock`, `serial.sock`, `qemu.pid`,
//! `qemu.log` (QEMU's own `-D` log, which after daemonizing is also where
//! its error messages go) and `launch.err` (the pre-daemonize stderr).
//!
//! A VM with a vTPM also has its swtpm ([`crate::swtpm`]): started before
//! QEMU, stopped after it, adopted with it.
//!
//! A pid from a pid file is only trusted after `/proc/PID/cmdline` shows it
//! is the QEMU that was started with *this* directory's pid file
//! ([`crate::owned`]).

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ferry_types::VmName;
use serde::{Deserialize, Serialize};

use crate::accel::{resolve_accel, Accel, AccelChoice};
use crate::owned::{self, read_pid, remove_if_exists};
use crate::qmp::Qmp;
use crate::spec::{Boot, DiskBus, MachineType, VmSpec};
use crate::swtpm::{self, Swtpm};
use crate::VmmError;

/// The QEMU parent process returns once the daemon is initialised; guest RAM
/// preallocation can make that slow on big guests, hence a generous bound.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(60);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// QEMU 7.2's default is 32 MiB/s, which makes any real migration crawl.
const DEFAULT_MAX_BANDWIDTH: u64 = 10 << 30;
/// QEMU's own default downtime limit.
const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;

const QMP_SOCK: &str = "qmp.sock";
const SERIAL_SOCK: &str = "serial.sock";
const PID_FILE: &str = "qemu.pid";
const LOG_FILE: &str = "qemu.log";
const LAUNCH_ERR: &str = "launch.err";

/// Host-side QEMU configuration (from the agent's config file, never from a peer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub binary: PathBuf,
    /// swtpm, for VMs with a vTPM.
    pub swtpm: PathBuf,
    pub accel: AccelChoice,
    /// Where [`crate::ImageName`]s are resolved.
    pub images_dir: PathBuf,
    /// Parent of the per-VM directories.
    pub run_dir: PathBuf,
    /// Applied by the caller with [`Qmp::set_migration_parameters`].
    pub max_bandwidth_bytes_per_s: u64,
    pub downtime_limit_ms: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            swtpm: PathBuf::from("swtpm"),
            accel: AccelChoice::Auto,
            images_dir: PathBuf::from("/var/lib/ferry/images"),
            run_dir: PathBuf::from("/run/ferry/vms"),
            max_bandwidth_bytes_per_s: DEFAULT_MAX_BANDWIDTH,
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
        }
    }
}

/// How to start QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchMode {
    /// Boot the guest now.
    Run,
    /// Migration destination: `-incoming defer -S`. QEMU waits for
    /// `migrate-incoming`, and after the state arrives stays paused until
    /// the agent decides to `cont` (autostart off).
    Incoming,
}

/// A running QEMU this host is responsible for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    pub name: VmName,
    pub pid: u32,
    /// Canonical per-VM directory.
    pub dir: PathBuf,
    pub accel: Accel,
    /// The VM's vTPM, if it has one and its swtpm runs.
    pub swtpm: Option<Swtpm>,
}

impl QemuProcess {
    pub fn qmp_path(&self) -> PathBuf {
        self.dir.join(QMP_SOCK)
    }
    pub fn serial_path(&self) -> PathBuf {
        self.dir.join(SERIAL_SOCK)
    }
    pub fn pid_path(&self) -> PathBuf {
        self.dir.join(PID_FILE)
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Connects a QMP client. QEMU serves one QMP client per socket at a
    /// time: a second connect waits until the first client disconnects.
    pub async fn qmp(&self) -> Result<Qmp, VmmError> {
        Qmp::connect(&self.qmp_path()).await
    }

    /// The pid is alive (not a zombie) and is still this VM's QEMU.
    pub fn is_alive(&self) -> bool {
        owned_qemu(self.pid, &self.dir).is_some()
    }

    /// Stops QEMU: SIGTERM (QEMU exits cleanly and removes its sockets),
    /// then SIGKILL if it lingers, then its swtpm (which normally exits
    /// with QEMU), then removes leftover sockets and the pid file. Blocks
    /// for at most a few seconds, so async callers with many VMs may prefer
    /// `spawn_blocking`. Killing a dead VM is not an error.
    pub fn kill(&self) -> Result<(), VmmError> {
        owned::stop(self.pid, "QEMU", || self.is_alive())?;
        if let Some(swtpm) = &self.swtpm {
            swtpm.kill()?;
        }
        for f in [QMP_SOCK, SERIAL_SOCK, PID_FILE] {
            remove_if_exists(&self.dir.join(f))?;
        }
        Ok(())
    }
}

/// The argument list for `spec` (never a shell string). `dir` is the VM's
/// directory. Everything guest-visible derives from `spec` alone, so both
/// ends of a migration build compatible machines; only the accelerator and
/// host paths may differ.
pub fn qemu_args(
    cfg: &QemuConfig,
    spec: &VmSpec,
    mode: LaunchMode,
    accel: Accel,
    dir: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(48);
    let mut push = |parts: &[&dyn AsRef<std::ffi::OsStr>]| {
        for p in parts {
            a.push(p.as_ref().to_owned());
        }
    };
    let sock_opt = |prefix: &str, file: &str, suffix: &str| -> OsString {
        let mut s = OsString::from(prefix);
        s.push(dir.join(file));
        s.push(suffix);
        s
    };
    // Named threads (live_migration, CPU 0/TCG, multifdsend_N) let an
    // operator or the benchmark see which thread of QEMU is busy.
    push(&[&"-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&[&"-no-user-config", &"-nodefaults", &"-display", &"none"]);
    push(&[&"-machine", &spec.machine.qemu_name()]);
    push(&[&"-accel", &accel.qemu_name(), &"-cpu", &accel.cpu_model()]);
    push(&[&"-m", &format!("{}M", spec.memory_mib), &"-smp", &spec.vcpus.to_string()]);
    push(&[&"-qmp", &sock_opt("unix:", QMP_SOCK, ",server=on,wait=off")]);
    push(&[
        &"-chardev",
        &sock_opt("socket,id=serial0,path=", SERIAL_SOCK, ",server=on,wait=off"),
        &"-serial",
        &"chardev:serial0",
    ]);
    push(&[&"-pidfile", &dir.join(PID_FILE), &"-D", &dir.join(LOG_FILE), &"-daemonize"]);
    match &spec.boot {
        Boot::Kernel { kernel, initrd, cmdline } => {
            push(&[&"-kernel", &cfg.images_dir.join(kernel.as_str())]);
            if let Some(initrd) = initrd {
                push(&[&"-initrd", &cfg.images_dir.join(initrd.as_str())]);
            }
            push(&[&"-append", cmdline]);
        }
        Boot::Disk { image, bus } => {
            let mut drive = OsString::from("file=");
            drive.push(cfg.images_dir.join(image.as_str()));
            let format = image.disk_format().qemu_name();
            match disk_controller(spec.machine, *bus) {
                // Unchanged since before buses existed: an older agent at the
                // other end builds the same machine.
                None => drive.push(format!(",if=virtio,format={format}")),
                Some(devices) => {
                    drive.push(format!(",if=none,id={DISK_ID},format={format}"));
                    for device in devices {
                        push(&[&"-device", &device]);
                    }
                }
            }
            push(&[&"-drive", &drive]);
        }
        // Refused by `launch` before any argument is built.
        Boot::Domain { .. } => {}
    }
    if let Some(device) = spec.tpm.qemu_device() {
        push(&[
            &"-chardev",
            &sock_opt("socket,id=vtpm0,path=", swtpm::CTRL_SOCK, ""),
            &"-tpmdev",
            &"emulator,id=tpm0,chardev=vtpm0",
            &"-device",
            &format!("{device},tpmdev=tpm0"),
        ]);
    }
    if mode == LaunchMode::Incoming {
        push(&[&"-incoming", &"defer", &"-S"]);
    }
    a
}

/// The `-drive` id of the boot disk when a device is attached to it by hand.
const DISK_ID: &str = "disk0";

/// The `-device`s that put the boot disk on `bus`, or `None` for virtio,
/// which `-drive if=virtio` attaches itself. `ide.0` is the first bus of the
/// controller the machine has built in: PIIX IDE on `pc`, ICH9 AHCI on `q35`
/// (spec validation refuses IDE on q35, which has no IDE controller).
fn disk_controller(machine: MachineType, bus: DiskBus) -> Option<Vec<String>> {
    let disk = |on: &str| format!("ide-hd,drive={DISK_ID},bus={on}");
    match (bus, machine) {
        (DiskBus::Virtio, _) => None,
        (DiskBus::Ide, _) | (DiskBus::Sata, MachineType::Q35) => Some(vec![disk("ide.0")]),
        (DiskBus::Sata, MachineType::Pc) => Some(vec!["ahci,id=sata0".into(), disk("sata0.0")]),
    }
}

/// QEMU option strings use ',' as a separator (and -initrd for multiboot
/// splits on it), so host paths containing one are refused outright rather
/// than escaped inconsistently.
fn check_host_path(path: &Path) -> Result<(), VmmError> {
    if path.as_os_str().as_bytes().contains(&b',') {
        return Err(VmmError::io(
            format!("host path {path:?}"),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains ','"),
        ));
    }
    Ok(())
}

fn check_socket_path(path: &Path) -> Result<(), VmmError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(VmmError::SocketPathTooLong {
            path: path.to_owned(),
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    Ok(())
}

/// Starts QEMU for `spec`, detached. Refuses if the VM's directory already
/// has a live QEMU. Does not apply migration parameters: connect with
/// [`QemuProcess::qmp`] and call [`Qmp::set_migration_parameters`].
pub async fn launch(
    cfg: &QemuConfig,
    spec: &VmSpec,
    mode: LaunchMode,
) -> Result<QemuProcess, VmmError> {
    spec.validate()?;
    let accel = resolve_accel(cfg.accel)?;
    check_host_path(&cfg.images_dir)?;

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&cfg.run_dir)
        .map_err(|e| VmmError::io(format!("creating {:?}", cfg.run_dir), e))?;
    // Canonical, so that adopt() (which canonicalises too) matches the
    // pid-file path recorded in QEMU's command line byte for byte.
    let run_dir = std::fs::canonicalize(&cfg.run_dir)
        .map_err(|e| VmmError::io(format!("resolving {:?}", cfg.run_dir), e))?;
    check_host_path(&run_dir)?;
    if spec.boot.is_domain() {
        return Err(VmmError::LibvirtDomain { name: spec.name.to_string() });
    }
    let dir = run_dir.join(spec.name.as_str());
    // 0700: whoever can reach qmp.sock fully controls the VM.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| VmmError::io(format!("creating {dir:?}"), e))?;
    check_socket_path(&dir.join(SERIAL_SOCK))?;

    if let Some(existing) = adopt(&dir).await? {
        return Err(VmmError::AlreadyRunning { name: spec.name.to_string(), pid: existing.pid });
    }
    // Leftovers of a QEMU that was SIGKILLed; stale pid files must not be
    // mistaken for the new process's.
    for f in [QMP_SOCK, SERIAL_SOCK, PID_FILE] {
        remove_if_exists(&dir.join(f))?;
    }

    // The vTPM listens before QEMU starts: QEMU connects to it at once.
    let swtpm = match spec.tpm.is_none() {
        true => None,
        false => {
            check_socket_path(&dir.join(swtpm::CTRL_SOCK))?;
            Some(swtpm::start(&cfg.swtpm, &dir).await?)
        }
    };
    match spawn(cfg, spec, mode, accel, &dir).await {
        Ok(pid) => {
            let proc = QemuProcess { name: spec.name.clone(), pid, dir, accel, swtpm };
            tracing::info!(vm = %proc.name, pid, "QEMU running");
            Ok(proc)
        }
        Err(e) => {
            // Never leave a vTPM behind without its VM; its state is the
            // fresh one just made, so nothing of a VM is lost with it.
            if let Some(swtpm) = swtpm {
                let dir = dir.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    swtpm.kill().and_then(|()| swtpm::erase(&dir))
                })
                .await;
            }
            Err(e)
        }
    }
}

/// Run QEMU until it daemonized; its pid.
async fn spawn(
    cfg: &QemuConfig,
    spec: &VmSpec,
    mode: LaunchMode,
    accel: Accel,
    dir: &Path,
) -> Result<u32, VmmError> {
    let args = qemu_args(cfg, spec, mode, accel, dir);
    let log_path = dir.join(LOG_FILE);
    let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    let err_path = dir.join(LAUNCH_ERR);
    let err_file = std::fs::File::create(&err_path)
        .map_err(|e| VmmError::io(format!("creating {err_path:?}"), e))?;
    tracing::info!(vm = %spec.name, ?mode, ?accel, "launching QEMU");
    tracing::debug!(binary = ?cfg.binary, ?args, "QEMU command line");
    // stderr goes to a file, not a pipe: the daemon inherits the parent's
    // descriptors and a pipe would only see EOF when the daemon closes it.
    let mut cmd = tokio::process::Command::new(&cfg.binary);
    cmd.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::from(err_file));
    crate::spawn::inherit_only_stdio(&mut cmd);
    let mut child =
        cmd.spawn().map_err(|e| VmmError::io(format!("spawning {:?}", cfg.binary), e))?;
    let status = match tokio::time::timeout(LAUNCH_TIMEOUT, child.wait()).await {
        Ok(status) => status.map_err(|e| VmmError::io("waiting for QEMU", e))?,
        Err(_) => {
            // The parent never reported readiness; do not leave it behind.
            let _ = child.start_kill();
            return Err(VmmError::Timeout {
                what: format!("QEMU for {} to daemonize", spec.name),
                after: LAUNCH_TIMEOUT,
            });
        }
    };
    if !status.success() {
        // With -D, QEMU 7.2 sends even its start-up errors to the log file
        // rather than stderr, so report both.
        let stderr = format!("{}\n{}", read_from(&err_path, 0), read_from(&log_path, log_start));
        return Err(VmmError::LaunchFailed {
            status: status.to_string(),
            stderr: stderr.trim().chars().take(4096).collect(),
        });
    }
    let pid_path = dir.join(PID_FILE);
    let pid = read_pid(&pid_path)?.ok_or_else(|| VmmError::PidFile {
        path: pid_path.clone(),
        why: "missing or not a number".into(),
    })?;
    if owned_qemu(pid, dir).is_none() {
        let log = read_from(&log_path, log_start);
        return Err(VmmError::LaunchFailed {
            status: format!("daemon pid {pid} exited right after start"),
            stderr: log.trim().chars().take(4096).collect(),
        });
    }
    Ok(pid)
}

/// Best-effort diagnostics: the text of `path` from byte `offset` (from the
/// start if the file was truncated since), lossily decoded, at most 64 KiB.
fn read_from(path: &Path, offset: u64) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = usize::try_from(offset).unwrap_or(0);
    let tail = bytes.get(start..).unwrap_or(&bytes);
    let tail = &tail[tail.len().saturating_sub(64 << 10)..];
    String::from_utf8_lossy(tail).into_owned()
}

/// The arguments of `pid` if it is a live QEMU started with `-pidfile DIR/qemu.pid`.
fn owned_qemu(pid: u32, dir: &Path) -> Option<Vec<Vec<u8>>> {
    let want = dir.join(PID_FILE);
    owned::live_args(pid, |args| owned::has_arg_pair(args, "-pidfile", want.as_os_str().as_bytes()))
}

/// After an agent restart: the QEMU recorded in `dir/qemu.pid`, if that pid
/// is alive and really is this directory's QEMU; otherwise `None`.
pub async fn adopt(dir: &Path) -> Result<Option<QemuProcess>, VmmError> {
    let dir = match std::fs::canonicalize(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VmmError::io(format!("resolving {dir:?}"), e)),
    };
    let Some(name) =
        dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<VmName>().ok())
    else {
        return Ok(None);
    };
    let Some(pid) = read_pid(&dir.join(PID_FILE))? else {
        return Ok(None);
    };
    let Some(args) = owned_qemu(pid, &dir) else {
        tracing::debug!(vm = %name, pid, "pid file does not name a live QEMU of this VM");
        return Ok(None);
    };
    let accel = match args.windows(2).find(|w| w[0] == b"-accel").map(|w| w[1].as_slice()) {
        Some(b"kvm") => Accel::Kvm,
        _ => Accel::Tcg,
    };
    let swtpm = swtpm::adopt(&dir)?;
    Ok(Some(QemuProcess { name, pid, dir, accel, swtpm }))
}

/// Every live QEMU under `cfg.run_dir`, e.g. to re-adopt after a restart.
pub async fn list(cfg: &QemuConfig) -> Result<Vec<QemuProcess>, VmmError> {
    let entries = match std::fs::read_dir(&cfg.run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(VmmError::io(format!("listing {:?}", cfg.run_dir), e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| VmmError::io(format!("listing {:?}", cfg.run_dir), e))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            if let Some(p) = adopt(&entry.path()).await? {
                out.push(p);
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
#[path = "process_tests.rs"]
mod tests;
