//! Durable migration records: one JSON file per migration, replaced
//! atomically (write, fsync, rename, fsync the directory) at every state
//! change, so an agent that restarts knows exactly where each migration was.
//! A destination's records double as its seen-set of migration ids.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_types::{Digest32, HostName, MigrationId, VmName};
use ferry_vmm::TpmModel;
use serde::{Deserialize, Serialize};

/// Largest record file read back; records are small.
const MAX_RECORD_LEN: u64 = 1024 * 1024;

use ferry_session::Step;
pub use ferry_session::{MigrationState, Role};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRecord {
    pub id: MigrationId,
    pub role: Role,
    pub vm: VmName,
    pub source: HostName,
    pub destination: HostName,
    /// Changed only by [`MigrationRecord::enter`], with a step of the
    /// session's transition table.
    state: MigrationState,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    pub bytes: u64,
    pub digest: Option<Digest32>,
    /// Why it was aborted or is in doubt.
    pub error: Option<String>,
    /// Source only: QEMU's own figure for the VM's downtime.
    pub qemu_downtime_ms: Option<u64>,
    /// Record creation to its final state: setup, the destination's
    /// launch, the transfer, the gate and the Receipt.
    pub total_ms: Option<u64>,
    /// Source only: QEMU's own figure for the whole migration (migrate
    /// command to completed), the figure plain QEMU reports for itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu_total_ms: Option<u64>,
    /// Connect to "both platforms attested", in ms.
    #[serde(default)]
    pub setup_ms: Option<u64>,
    #[serde(default)]
    pub attestation: Option<crate::attestation::AttestationOutcome>,
    /// Protections that were off for this migration (insecure settings).
    #[serde(default)]
    pub insecure: Vec<String>,
    /// The destination's signed receipt (source) or the one sent (destination).
    #[serde(default)]
    pub receipt: Option<ferry_audit::Signed>,
    /// Data streams used: 1, or 1 + QEMU multifd channels.
    #[serde(default)]
    pub streams: u8,
    /// Post-copy was allowed for this migration.
    #[serde(default)]
    pub postcopy: bool,
    /// Source, post-copy lost: the destination has acknowledged it.
    #[serde(default)]
    pub peer_told: bool,
    /// Destination only: how long the resume gate held the VM once its
    /// state had arrived (under libvirt: once QEMU had loaded it) while
    /// the source's Commit was awaited, checked and the resume audited:
    /// the gate's own share of the guest's downtime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_hold_ms: Option<u64>,
    /// Destination only, from the gate on: the Offer's channel binding, so
    /// that an agent restarted before its Receipt can still sign one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_binding: Option<Digest32>,
    /// The VM's vTPM model (its state moved inside the stream).
    #[serde(default, skip_serializing_if = "TpmModel::is_none")]
    pub tpm: TpmModel,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MigrationRecord {
    pub fn new(
        id: MigrationId,
        role: Role,
        vm: VmName,
        source: HostName,
        destination: HostName,
    ) -> Self {
        let now = now_unix_ms();
        Self {
            id,
            role,
            vm,
            source,
            destination,
            state: MigrationState::Preparing,
            created_unix_ms: now,
            updated_unix_ms: now,
            bytes: 0,
            digest: None,
            error: None,
            qemu_downtime_ms: None,
            qemu_total_ms: None,
            total_ms: None,
            setup_ms: None,
            attestation: None,
            insecure: Vec::new(),
            receipt: None,
            streams: 1,
            postcopy: false,
            peer_told: false,
            gate_hold_ms: None,
            tpm: TpmModel::None,
            channel_binding: None,
        }
    }

    pub fn state(&self) -> MigrationState {
        self.state
    }

    /// Take a legal step of the transition table (only `table::next` makes
    /// one). The caller records the result durably.
    pub(crate) fn enter(&mut self, step: &Step) {
        self.state = step.to;
    }

    /// Tests: bring the record to `to` by legal steps of the table only
    /// (the shortest path of rows that are not restarts).
    #[cfg(test)]
    pub(crate) fn walk_to(&mut self, to: MigrationState) {
        use ferry_session::{Event, On};
        let event = |on: On| match on {
            On::Accepted => Some(Event::Accepted),
            On::Committed => Some(Event::Committed),
            On::ReceiptVerified => Some(Event::ReceiptVerified),
            On::HandedOver => Some(Event::HandedOver),
            On::DigestsMatched => Some(Event::DigestsMatched),
            On::Resumed => Some(Event::Resumed),
            On::PostcopyDone => Some(Event::PostcopyDone),
            On::Failed => Some(Event::Failed),
            On::PeerAborted => Some(Event::PeerAborted),
            On::SourceLost => Some(Event::SourceLost),
            On::Resolved(o) => Some(Event::Resolved(o)),
            On::Restarted(_) => None,
        };
        let mut paths = vec![(self.state, Vec::new())];
        let mut seen = vec![self.state];
        while let Some((at, path)) = (!paths.is_empty()).then(|| paths.remove(0)) {
            if at == to {
                for e in path {
                    let step = ferry_session::next(self.role, self.state, e).expect("legal");
                    self.enter(&step);
                }
                return;
            }
            for (role, from, on, next, ..) in ferry_session::ROWS {
                if *role == self.role && *from == at && !seen.contains(next) {
                    if let Some(e) = event(*on) {
                        seen.push(*next);
                        let mut p = path.clone();
                        p.push(e);
                        paths.push((*next, p));
                    }
                }
            }
        }
        panic!("no path to {to} for a {:?} record", self.role);
    }

    pub fn peer(&self) -> &HostName {
        match self.role {
            Role::Source => &self.destination,
            Role::Destination => &self.source,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("cannot write migration record {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read migration records in {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("migration record {path:?} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

pub struct RecordStore {
    dir: PathBuf,
}

impl RecordStore {
    pub fn open(dir: &Path) -> Result<Self, RecordError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| RecordError::Write { path: dir.to_owned(), source })?;
        Ok(Self { dir: dir.to_owned() })
    }

    fn path(&self, id: &MigrationId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Durably replace the record. When this returns Ok the state survives a
    /// crash; callers move the migration on only after that.
    pub fn save(&self, rec: &mut MigrationRecord) -> Result<(), RecordError> {
        rec.updated_unix_ms = now_unix_ms();
        let path = self.path(&rec.id);
        let werr = |source| RecordError::Write { path: path.clone(), source };
        let body = serde_json::to_vec_pretty(rec).map_err(|e| werr(std::io::Error::other(e)))?;
        write_durably(&path, &body).map_err(werr)
    }

    /// Create a record that must not exist yet: the seen-set check and the
    /// insert are one `create_new`, so two offers with one id cannot both pass.
    pub fn create(&self, rec: &mut MigrationRecord) -> Result<bool, RecordError> {
        let path = self.path(&rec.id);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(source) => return Err(RecordError::Write { path, source }),
        }
        self.save(rec)?;
        Ok(true)
    }

    pub fn get(&self, id: &MigrationId) -> Result<Option<MigrationRecord>, RecordError> {
        let path = self.path(id);
        if !path.exists() {
            return Ok(None);
        }
        read_record(&path).map(Some)
    }

    pub fn contains(&self, id: &MigrationId) -> bool {
        self.path(id).exists()
    }

    /// All records, oldest first (UUIDv7 ids sort by time).
    pub fn all(&self) -> Result<Vec<MigrationRecord>, RecordError> {
        let rerr = |source| RecordError::Read { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(rerr)? {
            let path = entry.map_err(rerr)?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match read_record(&path) {
                    Ok(r) => out.push(r),
                    // A record created but not yet written (crash between
                    // create_new and save) is empty: it still marks the id seen.
                    Err(RecordError::Corrupt { .. }) if file_len(&path) == 0 => {}
                    Err(e) => return Err(e),
                }
            }
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_record(path: &Path) -> Result<MigrationRecord, RecordError> {
    let len = file_len(path);
    if len > MAX_RECORD_LEN {
        return Err(RecordError::Corrupt {
            path: path.to_owned(),
            why: format!("{len} bytes is too large"),
        });
    }
    let bytes = std::fs::read(path)
        .map_err(|source| RecordError::Read { path: path.to_owned(), source })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| RecordError::Corrupt { path: path.to_owned(), why: e.to_string() })
}

/// Write `body` to `path` atomically and durably.
pub fn write_durably(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| std::io::Error::other("path has no parent"))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> MigrationRecord {
        MigrationRecord::new(
            MigrationId::new(),
            Role::Destination,
            "vm1".parse().unwrap(),
            "host1".parse().unwrap(),
            "host2".parse().unwrap(),
        )
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let mut r = rec();
        assert!(store.create(&mut r).unwrap());
        let step = ferry_session::next(
            Role::Destination,
            MigrationState::Preparing,
            ferry_session::Event::Failed,
        )
        .unwrap();
        r.enter(&step);
        store.save(&mut r).unwrap();
        let again = RecordStore::open(dir.path()).unwrap();
        let back = again.get(&r.id).unwrap().unwrap();
        assert_eq!(back.state(), MigrationState::Aborted);
        assert_eq!(again.all().unwrap().len(), 1);
    }

    #[test]
    fn an_id_can_be_created_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let mut r = rec();
        assert!(store.create(&mut r).unwrap());
        let mut replay = r.clone();
        assert!(!store.create(&mut replay).unwrap(), "a seen id was accepted again");
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = RecordStore::open(dir.path()).unwrap();
        let r = rec();
        std::fs::write(dir.path().join(format!("{}.json", r.id)), b"{not json").unwrap();
        let e = store.all().unwrap_err().to_string();
        assert!(e.contains(&r.id.to_string()), "{e}");
    }
}
