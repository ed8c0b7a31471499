//! Evidence bundles: everything about one migration, from one or both
//! hosts' logs, that a third party checks offline with only the CA cert.
//!
//! A bundle holds the signed protocol messages and the exact log lines that
//! mention the migration, plus, for each log, the line carrying the host
//! certificate those lines are signed under. Lines are copied verbatim, so
//! each keeps its own signature; where lines are consecutive in their log
//! the hash chain between them is checked too. A bundle shows what each host
//! signed; it cannot show that a host's log holds nothing *else* about the
//! migration (that is `cross_check`, which needs the whole logs).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::{AuditError, MessageFault, VerifyError};
use crate::record::{parse_line, Depth, Lines, Walker};
use crate::signed::{display, CaTrust};
use crate::verify::{PROTOCOL_KINDS, SIGNED_BY_DESTINATION, SIGNED_BY_SOURCE};
use crate::Signed;

const FORMAT: &str = "ferry-evidence-v1";

/// Evidence for one migration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EvidenceBundle {
    /// "ferry-evidence-v1".
    pub format: String,
    pub migration_id: String,
    /// The protocol messages (offer, accept, commit, receipt or abort), in
    /// protocol order, each exactly once.
    pub messages: Vec<Signed>,
    /// Excerpts of each host's log.
    pub logs: Vec<BundleLog>,
}

/// Lines from one host's log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleLog {
    /// The host that wrote the log (checked against its certificate).
    pub host: String,
    /// Where the log was read from (informational only).
    pub file: String,
    pub records: Vec<BundleRecord>,
}

/// One log line, verbatim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BundleRecord {
    /// 1-based line number in the log file (informational only).
    pub line: u64,
    pub text: String,
}

/// What a verified bundle shows.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct BundleSummary {
    pub migration_id: String,
    /// Signer of the Offer and Commit.
    pub source: Option<String>,
    /// Signer of the Accept and Receipt.
    pub destination: Option<String>,
    /// Kinds of the verified messages, in bundle order.
    pub messages: Vec<String>,
    /// "completed" (receipt), "aborted", or "unfinished".
    pub outcome: String,
    /// Hosts whose log records were verified.
    pub hosts: Vec<String>,
    pub records: usize,
}

fn mentions(parsed: &crate::record::Parsed, migration_id: &str) -> bool {
    let ev = &parsed.record.event;
    ev.migration_id.as_deref() == Some(migration_id)
        || ev.signed.as_ref().and_then(Signed::body_migration_id).as_deref() == Some(migration_id)
}

/// Collect the evidence about `migration_id` from the given logs (typically
/// the source's and the destination's). The logs are not verified here:
/// the bundle is, by whoever receives it.
pub fn export_bundle(logs: &[PathBuf], migration_id: &str) -> Result<EvidenceBundle, AuditError> {
    let mut out_logs = Vec::new();
    let mut messages: Vec<Signed> = Vec::new();
    for path in logs {
        if let Some(log) = export_one(path, migration_id, &mut messages)? {
            out_logs.push(log);
        }
    }
    if out_logs.is_empty() {
        let names: Vec<String> = logs.iter().map(|p| display(p)).collect();
        return Err(AuditError::NoSuchMigration {
            migration_id: migration_id.to_owned(),
            logs: names.join(", "),
        });
    }
    messages.sort_by_key(|m| PROTOCOL_KINDS.iter().position(|k| *k == m.kind));
    Ok(EvidenceBundle {
        format: FORMAT.into(),
        migration_id: migration_id.to_owned(),
        messages,
        logs: out_logs,
    })
}

fn export_one(
    path: &Path,
    migration_id: &str,
    messages: &mut Vec<Signed>,
) -> Result<Option<BundleLog>, AuditError> {
    let read_err = |source| AuditError::Read { path: path.to_owned(), source };
    let damaged = |line, fault| {
        AuditError::Damaged(Box::new(VerifyError::Record {
            path: display(path),
            line,
            seq: None,
            fault,
        }))
    };
    let mut lines = Lines::new(BufReader::new(File::open(path).map_err(read_err)?));
    // The latest certificate-carrying line, and whether it is in the bundle.
    let mut cert_line: Option<(BundleRecord, bool)> = None;
    let mut host = String::new();
    let mut records = Vec::new();
    while let Some((bytes, complete)) = lines.next_line().map_err(read_err)? {
        let line = lines.line_no;
        if !complete {
            return Err(damaged(line, crate::error::RecordFault::Incomplete));
        }
        let parsed = parse_line(&bytes).map_err(|f| damaged(line, f))?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if parsed.record.cert.is_some() {
            host = parsed.record.host.clone();
            cert_line = Some((BundleRecord { line, text: text.clone() }, false));
        }
        if !mentions(&parsed, migration_id) {
            continue;
        }
        // Each record needs the certificate it is signed under before it.
        if let Some((rec, included)) = &mut cert_line {
            if !*included {
                *included = true;
                if rec.line != line {
                    records.push(rec.clone());
                }
            }
        }
        records.push(BundleRecord { line, text });
        if let Some(msg) = parsed.record.event.signed {
            if PROTOCOL_KINDS.contains(&msg.kind.as_str()) && !messages.contains(&msg) {
                messages.push(msg);
            }
        }
    }
    Ok((!records.is_empty()).then(|| BundleLog { host, file: display(path), records }))
}

/// Verify a bundle with only the CA certificate: every message's signature
/// and signer, every log line's signature under its host's certificate, the
/// hash chain between consecutive lines, and that the messages are one
/// consistent migration (one of each kind, roles as the protocol says). The
/// error names the message (`message #i (kind)`) or log line that failed.
pub fn verify_bundle(bundle: &EvidenceBundle, ca: &CaTrust) -> Result<BundleSummary, VerifyError> {
    let bad = |why: String| VerifyError::Bundle(why);
    if bundle.format != FORMAT {
        return Err(bad(format!("unknown format {:?}", bundle.format)));
    }
    let mid = bundle.migration_id.as_str();
    // Protocol messages embedded in the log lines, with the record time.
    let mut embedded: Vec<(Signed, OffsetDateTime)> = Vec::new();
    let mut hosts = Vec::new();
    let mut n_records = 0;
    for (i, log) in bundle.logs.iter().enumerate() {
        let name = format!("bundle log #{i} ({})", log.host);
        let mut walker = Walker::new();
        let mut prev: Option<(u64, [u8; 32])> = None;
        for rec in &log.records {
            let fail =
                |seq, fault| VerifyError::Record { path: name.clone(), line: rec.line, seq, fault };
            let parsed = parse_line(rec.text.as_bytes()).map_err(|f| fail(None, f))?;
            let seq = parsed.record.seq;
            if let Some((pseq, phash)) = prev {
                if seq <= pseq {
                    return Err(fail(
                        Some(seq),
                        crate::error::RecordFault::Sequence { expected: pseq + 1, found: seq },
                    ));
                }
                // SECURITY: where the bundle has consecutive records, their
                // chain link is checked too, so they cannot be reordered or
                // interleaved with records of another log.
                if seq == pseq + 1 && parsed.record.prev != hex::encode(phash) {
                    return Err(fail(Some(seq), crate::error::RecordFault::Chain));
                }
            }
            walker.step_unchained(&parsed, Depth::Full(ca)).map_err(|f| fail(Some(seq), f))?;
            if parsed.record.cert.is_none() && !mentions(&parsed, mid) {
                return Err(fail(
                    Some(seq),
                    crate::error::RecordFault::Other(format!("not about migration {mid}")),
                ));
            }
            if let Some(msg) = &parsed.record.event.signed {
                embedded.push((msg.clone(), parsed.record.ts));
            }
            prev = Some((seq, parsed.hash));
            n_records += 1;
        }
        let host = walker.cert.map(|c| c.host).unwrap_or_default();
        if host != log.host {
            return Err(bad(format!(
                "{name}: its records are signed by {host:?}, not by {:?}",
                log.host
            )));
        }
        hosts.push(host);
    }

    let mut kinds = Vec::new();
    let mut signers: Vec<(String, String)> = Vec::new();
    for (i, msg) in bundle.messages.iter().enumerate() {
        let what = format!("message #{i} ({})", msg.kind);
        let fail = |fault| VerifyError::Message { what: what.clone(), fault };
        if !PROTOCOL_KINDS.contains(&msg.kind.as_str()) {
            return Err(fail(MessageFault::Malformed(format!(
                "{:?} is not a protocol message kind",
                msg.kind
            ))));
        }
        // Certificates are judged at the time the log recorded the message;
        // a message no record holds is judged now.
        let at = embedded
            .iter()
            .find(|(m, _)| m == msg)
            .map_or_else(OffsetDateTime::now_utc, |(_, t)| *t);
        let signer = msg.check(ca, at).map_err(fail)?.to_string();
        // Either side may abort; of everything else there is one.
        let second =
            signers.iter().any(|(k, s)| k == &msg.kind && (msg.kind != "abort" || s == &signer));
        if second {
            return Err(fail(MessageFault::Body(format!(
                "a second {:?} message for one migration",
                msg.kind
            ))));
        }
        // SECURITY: a valid message of another migration must not pass as
        // evidence for this one.
        if msg.body_migration_id().as_deref() != Some(mid) {
            return Err(fail(MessageFault::Body(format!(
                "the body does not name migration {mid}"
            ))));
        }
        kinds.push(msg.kind.clone());
        signers.push((msg.kind.clone(), signer));
    }
    // SECURITY: the messages list is not a selection: every protocol message
    // the included records hold must be in it, so a bundle cannot hide a
    // second, conflicting Commit that a log recorded.
    for (msg, _) in &embedded {
        if PROTOCOL_KINDS.contains(&msg.kind.as_str()) && !bundle.messages.contains(msg) {
            return Err(bad(format!(
                "a log record holds a {:?} message that the bundle's messages do not",
                msg.kind
            )));
        }
    }
    let signer_of = |k: &str| signers.iter().find(|(kind, _)| kind == k).map(|(_, s)| s.clone());
    let (source, destination) = (signer_of("offer"), signer_of("accept"));
    let roles = SIGNED_BY_SOURCE
        .iter()
        .map(|k| (*k, &source))
        .chain(SIGNED_BY_DESTINATION.iter().map(|k| (*k, &destination)));
    for (kind, expected) in roles {
        if let (Some(s), Some(e)) = (signer_of(kind), expected) {
            if &s != e {
                let i = bundle.messages.iter().position(|m| m.kind == kind).unwrap_or(0);
                return Err(VerifyError::Message {
                    what: format!("message #{i} ({kind})"),
                    fault: MessageFault::Untrusted(format!("signed by {s}, expected {e}")),
                });
            }
        }
    }
    if source.is_some() && source == destination {
        return Err(bad("Offer and Accept are signed by the same host".into()));
    }
    let outcome = match (signer_of("receipt"), signer_of("abort")) {
        (Some(_), None) => "completed",
        (None, Some(_)) => "aborted",
        (Some(_), Some(_)) => return Err(bad("both a Receipt and an Abort".into())),
        (None, None) => "unfinished",
    };
    Ok(BundleSummary {
        migration_id: mid.to_owned(),
        source,
        destination,
        messages: kinds,
        outcome: outcome.into(),
        hosts,
        records: n_records,
    })
}
