//! The agent's audit log: append-only JSON lines, hash-chained and signed,
//! each made durable (write + fdatasync) before `append` returns.
//!
//! Failure policy: every error is returned, never swallowed, so the agent can
//! fail closed (refuse to move the migration past the step it could not
//! record). A write that fails part-way is rolled back if possible and the
//! log is poisoned: the bytes at its tail are then unknown. The next append
//! first reads the whole file back and carries on only if it holds exactly
//! the chain this log acknowledged (so a freed disk brings the host back
//! without a restart); otherwise appends stay refused.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{AuditError, RecordFault, VerifyError};
use crate::record::{
    line_hash, parse_line, render_line, Depth, Lines, Parsed, Record, Walker, RECORD_KIND,
};
use crate::signed::{check_kind, display, signing_input, Signer};
use crate::Signed;

/// The log is readable by auditors on the host, writable only by the agent.
const LOG_MODE: u32 = 0o640;

/// One thing that happened, as the agent records it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// `[a-z0-9_]{1,32}`: "offer_sent", "offer_received", "accept", "commit",
    /// "receipt", "abort", "refused", "attestation", ...
    pub kind: String,
    pub migration_id: Option<String>,
    pub vm: Option<String>,
    pub peer: Option<String>,
    pub detail: serde_json::Value,
    /// The signed protocol message this event is about, if any, exactly as
    /// sent or received.
    pub signed: Option<Signed>,
}

impl AuditEvent {
    /// An event with no migration, VM, peer, detail or message.
    pub fn new(kind: &str) -> AuditEvent {
        AuditEvent {
            kind: kind.to_owned(),
            migration_id: None,
            vm: None,
            peer: None,
            detail: serde_json::Value::Null,
            signed: None,
        }
    }
}

/// Where a log stands: the last record's seq and the BLAKE3 hash of its
/// line. Put into a signed message (as a top-level `log_head` field of the
/// body), it lets the peer's log witness this log's length, so that
/// `cross_check` detects this log being cut back below it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogHead {
    pub seq: u64,
    /// Hex BLAKE3 of the record's line (without the newline).
    pub hash: String,
}

/// An open audit log, owned by one agent.
///
/// Single writer: the agent must not open the same file twice (two writers
/// would fork the chain, which `verify_log` then reports).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: File,
    signer: Signer,
    /// File length after the last good record: where to roll back to.
    len: u64,
    next_seq: u64,
    prev_hash: [u8; 32],
    /// The next record must carry the signer's certificate (new log, or the
    /// certificate was renewed since the last record).
    needs_cert: bool,
    poisoned: bool,
}

impl AuditLog {
    /// Open (creating if missing) the log at `path` for appending as `signer`.
    ///
    /// An existing log is checked before anything is appended: every line
    /// must parse, the seq numbers and hash chain must be intact, it must
    /// belong to the signer's host, and the last record's signature must
    /// verify. Since each record hashes the line before it, that one
    /// signature vouches for the whole chain. (Certificate chains to the CA
    /// are `verify_log`'s job: the agent holds no opinion about the CA here.)
    /// A damaged tail (e.g. a torn write) is refused, not repaired: the
    /// operator must look at it with `ferry audit verify`.
    pub fn open(path: &Path, signer: Signer) -> Result<AuditLog, AuditError> {
        let write_err = |source| AuditError::Write { path: path.to_owned(), source };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(LOG_MODE)
            .open(path)
            .map_err(write_err)?;
        let (walker, len) = check_existing(path, &file)?;
        if let Some(cert) = &walker.cert {
            // SECURITY: never append to another host's log: its records would
            // be signed by us but sit in a chain vouched for by someone else.
            if cert.host != signer.spiffe() {
                return Err(AuditError::NotOurLog {
                    path: path.to_owned(),
                    log_host: cert.host.clone(),
                    signer: signer.spiffe().to_owned(),
                });
            }
        }
        let needs_cert = walker.cert.as_ref().is_none_or(|c| c.der != signer.cert_der());
        let mut log = AuditLog {
            path: path.to_owned(),
            file,
            signer,
            len,
            next_seq: walker.next_seq,
            prev_hash: walker.prev_hash,
            needs_cert,
            poisoned: false,
        };
        if log.next_seq == 0 {
            let mut genesis = AuditEvent::new("genesis");
            genesis.detail = serde_json::json!({ "format": "ferry-audit-v1" });
            log.append(&genesis)?;
            // The new file's directory entry must be durable too, or a crash
            // could lose the whole log although its records were fsynced.
            sync_dir(path).map_err(write_err)?;
        } else if log.needs_cert {
            let mut ev = AuditEvent::new("signer_cert_changed");
            ev.detail = serde_json::json!({ "reason": "the host certificate differs from the one in force" });
            log.append(&ev)?;
        }
        Ok(log)
    }

    /// Append `event` and make it durable. Returns its seq. On error nothing
    /// may be assumed recorded: the caller must fail closed.
    pub fn append(&mut self, event: &AuditEvent) -> Result<u64, AuditError> {
        self.append_all(std::slice::from_ref(event)).map(|seqs| seqs.start)
    }

    /// Append `events` in order, chained as if appended one by one, with one
    /// write and one fdatasync: all are durable when it returns. Returns
    /// their seqs. On error none may be assumed recorded.
    pub fn append_all(
        &mut self,
        events: &[AuditEvent],
    ) -> Result<std::ops::Range<u64>, AuditError> {
        if self.poisoned {
            self.heal()?;
        }
        for event in events {
            check_kind(&event.kind)
                .map_err(|why| AuditError::BadKind { kind: event.kind.clone(), why })?;
        }
        let (first, mut prev_hash, mut needs_cert) =
            (self.next_seq, self.prev_hash, self.needs_cert);
        let mut bytes = Vec::new();
        for (seq, event) in (first..).zip(events) {
            let record = Record {
                seq,
                prev: hex::encode(prev_hash),
                ts: OffsetDateTime::now_utc(),
                host: self.signer.spiffe().to_owned(),
                cert: needs_cert.then(|| B64.encode(self.signer.cert_der())),
                event,
            };
            let raw = serde_json::to_string(&record)
                .map_err(|source| AuditError::Encode { what: "an audit record", source })?;
            let sig = self.signer.sign(&signing_input(RECORD_KIND, raw.as_bytes()));
            let line = render_line(&raw, &sig);
            bytes.extend_from_slice(line.as_bytes());
            bytes.push(b'\n');
            prev_hash = line_hash(line.as_bytes());
            needs_cert = false;
        }
        // One write of all the lines (O_APPEND), then fdatasync: the records
        // are on stable storage before we report them recorded.
        let result = self.file.write_all(&bytes).and_then(|()| self.file.sync_data());
        if let Err(source) = result {
            self.poisoned = true;
            // Best effort: cut a torn line off so that a reopen finds an
            // intact log. If this fails too, reopen refuses the damaged tail.
            if self.file.set_len(self.len).is_ok() {
                let _ = self.file.sync_data();
            }
            return Err(AuditError::Write { path: self.path.clone(), source });
        }
        self.len += bytes.len() as u64;
        self.next_seq = first + events.len() as u64;
        self.prev_hash = prev_hash;
        self.needs_cert = needs_cert;
        Ok(first..self.next_seq)
    }

    /// After a failed append: reopen and re-read the file; un-poison only if
    /// it ends exactly at the last acknowledged record.
    fn heal(&mut self) -> Result<(), AuditError> {
        let poisoned = || AuditError::Poisoned { path: self.path.clone() };
        let file =
            OpenOptions::new().read(true).append(true).open(&self.path).map_err(|_| poisoned())?;
        let (walker, len) = check_existing(&self.path, &file).map_err(|_| poisoned())?;
        // SECURITY: anything but our own chain, to the byte, stays refused:
        // appending after a torn or foreign tail would sign over it.
        if (walker.next_seq, walker.prev_hash, len) != (self.next_seq, self.prev_hash, self.len) {
            return Err(poisoned());
        }
        self.file = file;
        self.poisoned = false;
        Ok(())
    }

    /// The last record written: for embedding in signed messages as `log_head`.
    pub fn head(&self) -> LogHead {
        LogHead { seq: self.next_seq.saturating_sub(1), hash: hex::encode(self.prev_hash) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host whose log this is.
    pub fn host(&self) -> &str {
        self.signer.spiffe()
    }

    /// The signer, to sign protocol messages with the same identity.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }
}

fn damaged(path: &Path, line: u64, seq: Option<u64>, fault: RecordFault) -> AuditError {
    AuditError::Damaged(Box::new(VerifyError::Record { path: display(path), line, seq, fault }))
}

/// Walk an existing log's structure and check its last signature.
/// Returns the walker state and the file length.
fn check_existing(path: &Path, file: &File) -> Result<(Walker, u64), AuditError> {
    let read_err = |source| AuditError::Read { path: path.to_owned(), source };
    let mut lines = Lines::new(BufReader::new(file.try_clone().map_err(read_err)?));
    let mut walker = Walker::new();
    let mut last: Option<(Parsed, u64)> = None;
    let mut len = 0u64;
    while let Some((bytes, complete)) = lines.next_line().map_err(read_err)? {
        let n = lines.line_no;
        if !complete {
            let fault = if bytes.len() > crate::record::MAX_LINE {
                RecordFault::TooLong(crate::record::MAX_LINE)
            } else {
                RecordFault::Incomplete
            };
            return Err(damaged(path, n, None, fault));
        }
        let parsed = parse_line(&bytes).map_err(|f| damaged(path, n, None, f))?;
        let seq = parsed.record.seq;
        walker.step(&parsed, Depth::Structure).map_err(|f| damaged(path, n, Some(seq), f))?;
        len += bytes.len() as u64 + 1;
        last = Some((parsed, n));
    }
    // After the walk the certificate in force is the one that must verify the
    // last record (including one that the last record itself carries).
    if let Some((parsed, n)) = last {
        let seq = parsed.record.seq;
        walker.check_signature(&parsed).map_err(|f| damaged(path, n, Some(seq), f))?;
    }
    Ok((walker, len))
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}
