//! Small file helpers: reading with the path in the error, and atomic
//! writes with an explicit mode.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::IdentityError;

/// Mode for private keys: owner read/write only.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Mode for certificates, CRLs and the registry: public material.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Read { path: path.to_owned(), source })
}

/// Write `bytes` to `path` so that a reader sees either the old file or the
/// whole new one, never a torn file (an agent may be reading crl.pem while the
/// CA rewrites it) and so that a key file is never, even briefly, readable by
/// anyone but its owner: the temporary file is *created* with `mode`, not
/// chmod-ed afterwards. The rename also gives the file a new inode, which
/// `TlsConfigs` uses to notice a change even within one mtime tick.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |source| IdentityError::Write { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    // A stale temporary from a crashed run would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(werr(&tmp))?;
    let res = f.write_all(bytes).and_then(|()| f.sync_all()).and_then(|()| fs::rename(&tmp, path));
    if let Err(source) = res {
        let _ = fs::remove_file(&tmp);
        return Err(IdentityError::Write { path: path.to_owned(), source });
    }
    // Make the rename itself durable; failure here loses nothing already
    // visible, so it is not worth failing an issue/revoke over.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Create `dir` (and parents) with mode 0700 for new directories: the CA
/// directory holds the CA key.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| IdentityError::Write { path: dir.to_owned(), source })
}

/// Create `path` with `mode`, failing if it already exists (O_EXCL).
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let werr = |source| IdentityError::Write { path: path.to_owned(), source };
    let mut f =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(werr)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(werr)
}
