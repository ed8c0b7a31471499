//! A libvirt domain's vTPM on the move. libvirt runs the domain's swtpm on
//! each host and QEMU carries the TPM's state inside the migration stream
//! (so under Ferry's TLS and digest). What stays behind on the source is a
//! clone of a TPM that now lives elsewhere: it is erased after the
//! destination's Receipt unless the operator asked libvirt to keep it.

use std::path::{Path, PathBuf};

use ferry_vmm::DomainUuid;

use crate::domain::{DomainFacts, TpmFacts};

/// Where libvirt's QEMU driver keeps each domain's swtpm state, in a
/// directory named after the domain's UUID.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/libvirt/swtpm";

#[derive(Debug, thiserror::Error)]
pub enum VtpmError {
    #[error(
        "domain {name}'s vTPM has backend type {backend:?}; Ferry carries emulated vTPMs \
         (backend type='emulator'), whose state moves inside the migration stream"
    )]
    Backend { name: String, backend: String },
    #[error(
        "domain {name}'s vTPM state {dir} is on a shared filesystem ({fs}); swtpm 0.7 cannot \
         share vTPM state between hosts, so Ferry does not migrate it: keep libvirt's swtpm \
         state on local storage"
    )]
    SharedStorage { name: String, dir: PathBuf, fs: &'static str },
    #[error("cannot inspect the filesystem of the vTPM state {dir}")]
    Inspect {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory of a domain's vTPM state under libvirt's `root`. The UUID
/// is a checked [`DomainUuid`], so the path cannot leave `root`.
pub fn state_dir(root: &Path, uuid: &DomainUuid) -> PathBuf {
    root.join(uuid.as_str())
}

/// Refuse a vTPM Ferry cannot move: only an emulated one travels in the
/// stream (a passthrough TPM is the host's; an external swtpm's state is
/// out of libvirt's and Ferry's reach).
pub fn carryable(name: &str, tpm: &TpmFacts) -> Result<(), VtpmError> {
    match tpm.backend.as_str() {
        "emulator" => Ok(()),
        other => Err(VtpmError::Backend { name: name.to_owned(), backend: other.to_owned() }),
    }
}

/// Network and cluster filesystems by `statfs` magic: state on any of them
/// may be reachable from the destination too.
pub fn shared_filesystem(magic: i64) -> Option<&'static str> {
    Some(match magic {
        0x6969 => "nfs",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x517B => "smb",
        0x0116_1970 => "gfs2",
        0x7461_636F => "ocfs2",
        0x00C3_6400 => "ceph",
        0x4750_4653 => "gpfs",
        0x6573_5546 => "fuse (glusterfs, cephfs-fuse, ...)",
        0x0102_1997 => "9p",
        0x1983_0326 => "beegfs",
        0x5346_414F => "afs",
        0x0BD0_0BD0 => "lustre",
        _ => return None,
    })
}

/// The filesystem magic of `dir`, or of its nearest existing ancestor
/// (libvirt creates a domain's directory when its swtpm first starts).
#[allow(unsafe_code)]
pub fn filesystem_magic(dir: &Path) -> Result<i64, VtpmError> {
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let inspect = |source| VtpmError::Inspect { dir: dir.to_owned(), source };
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| inspect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let mut st = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` points to a statfs
    // buffer of the right size, which statfs fills on success.
    let rc = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(inspect(std::io::Error::last_os_error()));
    }
    // SAFETY: statfs returned 0, so it initialised the whole buffer.
    #[allow(clippy::unnecessary_cast)]
    Ok(unsafe { st.assume_init() }.f_type as i64)
}

/// Can `facts`' vTPM (if any) move, with its state kept under `root`?
pub fn check_movable(facts: &DomainFacts, uuid: &DomainUuid, root: &Path) -> Result<(), VtpmError> {
    let Some(tpm) = &facts.tpm else { return Ok(()) };
    carryable(&facts.name, tpm)?;
    let dir = state_dir(root, uuid);
    match shared_filesystem(filesystem_magic(&dir)?) {
        Some(fs) => Err(VtpmError::SharedStorage { name: facts.name.clone(), dir, fs }),
        None => Ok(()),
    }
}

/// What becomes of the source's vTPM state once the destination runs the
/// domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leftover {
    /// No vTPM.
    None,
    /// SECURITY: a clone of the moved TPM; erased so that it can never be
    /// started again beside the real one.
    Erase(PathBuf),
    /// The operator set `persistent_state='yes'`: libvirt's own promise to
    /// keep the state when the domain leaves this host.
    Keep(PathBuf),
}

pub fn leftover(facts: &DomainFacts, uuid: &DomainUuid, root: &Path) -> Leftover {
    match &facts.tpm {
        None => Leftover::None,
        Some(t) if t.persistent_state => Leftover::Keep(state_dir(root, uuid)),
        Some(_) => Leftover::Erase(state_dir(root, uuid)),
    }
}

#[cfg(test)]
#[path = "vtpm_tests.rs"]
mod tests;
