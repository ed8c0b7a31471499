//! ferry-vmm: Ferry's QEMU driver.
//!
//! * [`spec`]: the closed, validated description of a VM ([`VmSpec`]) that
//!   may travel between hosts.
//! * [`accel`]: KVM-or-TCG, refusing to mistake `kvm_pvm` for hardware KVM.
//! * [`process`]: launching QEMU detached (`-daemonize`) so VMs outlive an
//!   agent crash, and adopting them again after a restart.
//! * [`qmp`]: a small QMP client for status, run control and migration.
//! * [`watch`]: waiting on a migration through the one shared QMP handle.
//! * [`diagnostics`]: the read-only QMP commands operators may pass through.

pub mod accel;
pub mod diagnostics;
pub mod process;
pub mod qmp;
pub mod spec;
pub mod watch;

use std::path::PathBuf;
use std::time::Duration;

pub use accel::{detect_accel, resolve_accel, Accel, AccelChoice};
pub use diagnostics::{check_read_only, read_only_allowlist};
pub use process::{adopt, launch, list, qemu_args, LaunchMode, QemuConfig, QemuProcess};
pub use qmp::{MigrationState, MigrationStatus, Qmp, QmpEvent, RamStats, RunState, MAX_QMP_LINE};
pub use spec::{Boot, DiskBus, DiskFormat, DomainUuid, ImageName, MachineType, SpecError, VmSpec};
pub use watch::{poll_migration, wait_migration_done, wait_migration_terminal, Poll, SharedQmp};

/// Everything that can go wrong driving QEMU.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM spec: {0}")]
    Spec(#[from] SpecError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {name} is a libvirt domain: libvirt starts it, not Ferry")]
    LibvirtDomain { name: String },
    #[error("KVM was requested but /dev/kvm does not exist")]
    KvmUnavailable,
    #[error("path {path:?} is too long for a unix socket ({len} > {max} bytes)")]
    SocketPathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("VM {name} already has a live QEMU (pid {pid})")]
    AlreadyRunning { name: String, pid: u32 },
    #[error("QEMU failed to start ({status}): {stderr}")]
    LaunchFailed { status: String, stderr: String },
    #[error("QEMU started but its pid file {path:?} is unusable: {why}")]
    PidFile { path: PathBuf, why: String },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    #[error(
        "QMP command {command:?} is not a read-only diagnostic; allowed: {}",
        read_only_allowlist()
    )]
    NotReadOnly { command: String },
    #[error("QMP protocol error: {0}")]
    QmpProtocol(String),
    #[error("QMP connection closed")]
    QmpClosed,
    #[error("QMP line longer than {max} bytes")]
    QmpLineTooLong { max: usize },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("migration failed: {}", desc.as_deref().unwrap_or("QEMU gave no reason"))]
    MigrationFailed { desc: Option<String> },
    #[error("migration was cancelled")]
    MigrationCancelled,
    #[error("refusing migration capabilities: {0}")]
    UnsafeCapabilities(&'static str),
    #[error("could not signal QEMU pid {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::Error,
    },
}

impl VmmError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        VmmError::Io { what: what.into(), source }
    }
}
