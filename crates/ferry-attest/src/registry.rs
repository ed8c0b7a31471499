//! Enrolled attestation keys: one JSON file per host in a registry directory,
//! written only by the enrollment authority after credential activation
//! succeeded. Also the small file helpers the crate shares.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use ferry_types::HostName;
use serde::{Deserialize, Serialize};

use crate::AttestError;

/// Largest registry entry or key blob read from disk.
pub const MAX_RECORD_FILE: u64 = 64 * 1024;

/// An AK the authority has accepted: the only thing `verify` trusts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolledAk {
    /// The host this AK speaks for; must equal the peer's certified identity.
    pub host: HostName,
    /// SEC1 uncompressed P-256 point (65 bytes) of the AK.
    #[serde(with = "hex_bytes")]
    pub ak_public: Vec<u8>,
    /// TPM name of the AK (0x000b || SHA-256(TPMT_PUBLIC)).
    #[serde(with = "hex_bytes")]
    pub ak_name: Vec<u8>,
    /// SHA-256 (hex) of the DER EK certificate the AK was activated against.
    pub ek_cert_sha256: String,
}

pub(crate) mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(s).map_err(serde::de::Error::custom)
    }
}

/// All enrolled AKs, by host.
#[derive(Clone, Debug, Default)]
pub struct AkRegistry {
    by_host: BTreeMap<HostName, EnrolledAk>,
}

impl AkRegistry {
    /// Read every `<host>.json` in `dir`. A missing directory is an empty registry.
    pub fn load(dir: &Path) -> Result<Self, AttestError> {
        let mut by_host = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(AttestError::io(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| AttestError::io(dir, e))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let text = read_capped(&path, MAX_RECORD_FILE)?;
            let ak: EnrolledAk = serde_json::from_str(&text)
                .map_err(|e| AttestError::config(&path, e.to_string()))?;
            // Security: the file name is what the authority wrote for the host;
            // a record whose content names another host was moved or forged and
            // must not let one host's AK vouch for another.
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if stem != ak.host.as_str() {
                return Err(AttestError::config(
                    &path,
                    format!("file is for host {stem:?} but the record names {}", ak.host),
                ));
            }
            by_host.insert(ak.host.clone(), ak);
        }
        Ok(AkRegistry { by_host })
    }

    /// The AK enrolled for `host`, if any.
    pub fn get(&self, host: &HostName) -> Option<&EnrolledAk> {
        self.by_host.get(host)
    }

    /// The AK enrolled for `host`, or `NotEnrolled` naming it.
    pub fn require(&self, host: &HostName) -> Result<&EnrolledAk, AttestError> {
        self.get(host).ok_or_else(|| AttestError::NotEnrolled { host: host.clone() })
    }

    /// Record an enrolled AK as `dir/<host>.json` (replacing an older one).
    pub fn insert(dir: &Path, ak: &EnrolledAk) -> Result<(), AttestError> {
        std::fs::create_dir_all(dir).map_err(|e| AttestError::io(dir, e))?;
        let json = serde_json::to_vec_pretty(ak)
            .map_err(|e| AttestError::malformed("enrolled AK", e.to_string()))?;
        write_atomic(&dir.join(format!("{}.json", ak.host)), &json, 0o644)
    }

    /// Number of enrolled hosts.
    pub fn len(&self) -> usize {
        self.by_host.len()
    }

    /// Whether no host is enrolled.
    pub fn is_empty(&self) -> bool {
        self.by_host.is_empty()
    }
}

/// Read a UTF-8 file of at most `max` bytes.
pub(crate) fn read_capped(path: &Path, max: u64) -> Result<String, AttestError> {
    let file = std::fs::File::open(path).map_err(|e| AttestError::io(path, e))?;
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text).map_err(|e| AttestError::io(path, e))?;
    if text.len() as u64 > max {
        return Err(AttestError::config(path, format!("larger than {max} bytes")));
    }
    Ok(text)
}

/// Write via a temporary file and rename, so readers never see half a file;
/// the mode is set at creation so a secret is never briefly world-readable.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AttestError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp: PathBuf = {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        path.with_file_name(name)
    };
    // A leftover temporary file would keep its old mode: start afresh.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| AttestError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| AttestError::io(&tmp, e))?;
    f.sync_all().map_err(|e| AttestError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| AttestError::io(path, e))
}
