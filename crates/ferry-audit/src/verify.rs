//! Verifying one log completely, and two hosts' logs against each other.
//!
//! What a single log can and cannot show:
//! - editing, deleting, inserting or reordering any record, and a torn or
//!   partially truncated last record: detected, at the first record out of
//!   place (signature, seq, chain, or incomplete line);
//! - cutting the log back at a record boundary (dropping the last k records
//!   whole): NOT detectable from the log alone, since what remains is a
//!   valid log. It is detected when other evidence outlives the cut: the
//!   peer's log holding a message this host signed (hosts record what they
//!   sign before sending it), a `log_head` this host put in a signed message,
//!   or a head an auditor noted earlier (`LogSummary::head`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use serde::Serialize;
use time::OffsetDateTime;

use crate::error::{RecordFault, VerifyError};
use crate::log::LogHead;
use crate::record::{parse_line, Depth, Lines, Parsed, Walker, MAX_LINE};
use crate::signed::{body_field, display, CaTrust};

/// The protocol messages of one migration: at most one body of each per
/// migration (of an Abort, one per signer: either side may abort), and both
/// hosts must hold the same one. `switchover` and `handover` are post-copy's
/// Commit and Receipt for the stream up to the switch.
pub(crate) const PROTOCOL_KINDS: [&str; 7] =
    ["offer", "accept", "switchover", "handover", "commit", "receipt", "abort"];

/// Who must sign each kind: the Offer's signer (the source) or the Accept's.
pub(crate) const SIGNED_BY_SOURCE: [&str; 2] = ["switchover", "commit"];
pub(crate) const SIGNED_BY_DESTINATION: [&str; 2] = ["handover", "receipt"];

/// What a verified log contains.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct LogSummary {
    pub path: String,
    /// The host that wrote it.
    pub host: String,
    pub records: u64,
    /// The last record. Note it down: a later verification that finds the
    /// log shorter than this proves a truncation the log alone cannot show.
    pub head: LogHead,
    #[serde(with = "time::serde::rfc3339")]
    pub first: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last: OffsetDateTime,
    /// Migration ids mentioned, sorted.
    pub migrations: Vec<String>,
}

/// A verified record with its place in the file.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    pub line: u64,
    pub parsed: Parsed,
}

/// Verify every record of a log: structure, seq, chain, signatures,
/// certificates (chained to `ca` at each record's time) and every embedded
/// signed message. The error names the first bad record (line and seq).
pub fn verify_log(path: &Path, ca: &CaTrust) -> Result<LogSummary, VerifyError> {
    load_verified(path, ca).map(|(summary, _)| summary)
}

/// `verify_log`, keeping the records.
pub(crate) fn load_verified(
    path: &Path,
    ca: &CaTrust,
) -> Result<(LogSummary, Vec<Located>), VerifyError> {
    let name = display(path);
    let read_err = |source| VerifyError::Read { path: path.to_owned(), source };
    let file = File::open(path).map_err(read_err)?;
    let mut lines = Lines::new(BufReader::new(file));
    let mut walker = Walker::new();
    let mut out = Vec::new();
    let mut migrations = BTreeSet::new();
    while let Some((bytes, complete)) = lines.next_line().map_err(read_err)? {
        let line = lines.line_no;
        let fail = |seq, fault| VerifyError::Record { path: name.clone(), line, seq, fault };
        if !complete {
            let fault = if bytes.len() > MAX_LINE {
                RecordFault::TooLong(MAX_LINE)
            } else {
                RecordFault::Incomplete
            };
            return Err(fail(None, fault));
        }
        let parsed = parse_line(&bytes).map_err(|f| fail(None, f))?;
        walker.step(&parsed, Depth::Full(ca)).map_err(|f| fail(Some(parsed.record.seq), f))?;
        if let Some(m) = &parsed.record.event.migration_id {
            migrations.insert(m.clone());
        }
        out.push(Located { line, parsed });
    }
    let (Some(first), Some(last), Some(cert)) = (out.first(), out.last(), walker.cert.as_ref())
    else {
        return Err(VerifyError::Empty { path: name });
    };
    let summary = LogSummary {
        path: name,
        host: cert.host.clone(),
        records: out.len() as u64,
        head: LogHead { seq: last.parsed.record.seq, hash: hex::encode(last.parsed.hash) },
        first: first.parsed.record.ts,
        last: last.parsed.record.ts,
        migrations: migrations.into_iter().collect(),
    };
    Ok((summary, out))
}

/// What two logs say about the migrations between their hosts.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct CrossSummary {
    pub source: LogSummary,
    pub destination: LogSummary,
    /// Migrations found in both logs, all of whose messages agree.
    pub migrations: Vec<MigrationCheck>,
    /// Things that are not proof of tampering but an auditor should see
    /// (e.g. the source never recorded a Receipt the destination sent: the
    /// migration was in doubt, or the source log was cut at its tail).
    pub warnings: Vec<String>,
}

/// One migration both logs know about.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct MigrationCheck {
    pub migration_id: String,
    /// The signer of the Offer.
    pub source: Option<String>,
    /// The signer of the Accept.
    pub destination: Option<String>,
    /// Protocol message kinds both logs hold identical copies of.
    pub agreed: Vec<String>,
    /// "completed" (receipt), "aborted", "refused" (the destination's log
    /// records its refusal of the offer), or "unfinished".
    pub outcome: String,
}

/// A signed message found in a log, with where it was found.
#[derive(Clone, Debug)]
struct Held {
    line: u64,
    seq: u64,
    migration: Option<String>,
    signer: String,
}

type MsgKey = (String, String); // (kind, body)

fn index(records: &[Located]) -> BTreeMap<MsgKey, Held> {
    let mut map = BTreeMap::new();
    for r in records {
        let Some(msg) = &r.parsed.record.event.signed else {
            continue;
        };
        map.entry((msg.kind.clone(), msg.body.clone())).or_insert_with(|| Held {
            line: r.line,
            seq: r.parsed.record.seq,
            migration: r.parsed.record.event.migration_id.clone(),
            // Already verified by load_verified, so the claim is checked.
            signer: msg.claimed_signer().unwrap_or_default(),
        });
    }
    map
}

/// Verify both logs, then check them against each other:
/// - every message one host signed that the other host's log holds must be
///   in the signer's own log (hosts record what they sign before sending);
/// - every `log_head` a host put in a signed message must match that host's
///   log (same seq, same line hash): a log cut back, or rewritten after the
///   fact, cannot match what its host already told the peer;
/// - for each migration in both logs: one Offer, Accept, Commit, Receipt /
///   Abort each, identical bytes in both logs (so the Receipt the source
///   holds is the one the destination signed, and both saw the same Commit
///   digests), Offer and Commit signed by one host and Accept and Receipt by
///   the other.
pub fn cross_check(
    source_log: &Path,
    dest_log: &Path,
    ca: &CaTrust,
) -> Result<CrossSummary, VerifyError> {
    let (src, src_records) = load_verified(source_log, ca)?;
    let (dst, dst_records) = load_verified(dest_log, ca)?;
    if src.host == dst.host {
        return Err(VerifyError::CrossCheck(format!(
            "{} and {} are both logs of {}",
            src.path, dst.path, src.host
        )));
    }
    let src_index = index(&src_records);
    let dst_index = index(&dst_records);
    let mut warnings = Vec::new();
    for (holder, holder_index, owner, owner_records, owner_index) in [
        (&dst, &dst_index, &src, &src_records, &src_index),
        (&src, &src_index, &dst, &dst_records, &dst_index),
    ] {
        check_witnessed(holder, holder_index, owner, owner_records, owner_index)?;
    }

    let mut migrations = Vec::new();
    let both: Vec<&String> =
        src.migrations.iter().filter(|m| dst.migrations.binary_search(m).is_ok()).collect();
    for mid in both {
        let mut m = check_migration(mid, &src, &src_index, &dst, &dst_index, &mut warnings)?;
        // A destination that refused the offer says so in its own (signed)
        // log: the migration ended there, it is not unfinished.
        if m.outcome == "unfinished" && has_kind(&dst_records, mid, "refused") {
            m.outcome = "refused".into();
        }
        migrations.push(m);
    }
    for (a, a_records, b) in [(&src, &src_records, &dst), (&dst, &dst_records, &src)] {
        for m in &a.migrations {
            if b.migrations.binary_search(m).is_err() {
                warnings.push(one_sided(m, a, a_records, b));
            }
        }
    }
    Ok(CrossSummary { source: src, destination: dst, migrations, warnings })
}

/// Does the log hold a record of `kind` about migration `mid`?
fn has_kind(records: &[Located], mid: &str, kind: &str) -> bool {
    records
        .iter()
        .map(|r| &r.parsed.record.event)
        .any(|e| e.kind == kind && e.migration_id.as_deref() == Some(mid))
}

/// Why a migration in one log only is (or is not) expected. A request that
/// ended before any signed message left its host (denied by policy, rate
/// limit or cooldown; peer unreachable; attestation failed) never reaches
/// the peer's log; neither does a migration with a third host.
fn one_sided(mid: &str, a: &LogSummary, a_records: &[Located], b: &LogSummary) -> String {
    let events: Vec<&crate::log::AuditEvent> = a_records
        .iter()
        .map(|r| &r.parsed.record.event)
        .filter(|e| e.migration_id.as_deref() == Some(mid))
        .collect();
    let mut kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    kinds.dedup();
    let kinds = kinds.join(", ");
    // Logs name hosts by SPIFFE id, events by host name.
    let short = |h: &'_ str| h.rsplit('/').next().unwrap_or_default().to_owned();
    let b_host = short(&b.host);
    let peer = events.iter().find_map(|e| e.peer.as_deref()).map(short);
    if let Some(peer) = peer.filter(|p| *p != b_host) {
        return format!(
            "migration {mid} appears only in {} ({kinds}): expected, its peer is {peer}, not {b_host}",
            a.path
        );
    }
    match events.iter().find_map(|e| e.signed.as_ref()) {
        None => format!(
            "migration {mid} appears only in {} ({kinds}): expected, it ended before any signed \
             message left {} (denied by policy, rate limit or cooldown, peer unreachable, or \
             attestation failed), so {b_host} never heard of it",
            a.path, a.host
        ),
        Some(m) => format!(
            "migration {mid} appears only in {} ({kinds}), although it holds a signed {:?}: {b_host} \
             never recorded it (the connection broke before it arrived, or {} was cut back)",
            a.path, m.kind, b.path
        ),
    }
}

/// Messages `owner` signed that `holder`'s log holds must be in `owner`'s log,
/// and `log_head`s `owner` signed must match `owner`'s log.
fn check_witnessed(
    holder: &LogSummary,
    holder_index: &BTreeMap<MsgKey, Held>,
    owner: &LogSummary,
    owner_records: &[Located],
    owner_index: &BTreeMap<MsgKey, Held>,
) -> Result<(), VerifyError> {
    for ((kind, body), held) in holder_index {
        if held.signer != owner.host {
            continue;
        }
        let mid = held.migration.clone().unwrap_or_else(|| "-".into());
        if !owner_index.contains_key(&(kind.clone(), body.clone())) {
            return Err(VerifyError::Disagree {
                migration_id: mid,
                why: format!(
                    "{} line {} (seq {}) holds a {kind:?} message signed by {} that {} does not contain \
                     (its last record is seq {}): records were deleted or the log was cut back",
                    holder.path, held.line, held.seq, owner.host, owner.path, owner.head.seq
                ),
            });
        }
        let Some(head) = body_field(body, "log_head") else {
            continue;
        };
        let head: LogHead = serde_json::from_value(head).map_err(|e| VerifyError::Disagree {
            migration_id: mid.clone(),
            why: format!(
                "{} line {}: the {kind:?} message has a malformed log_head: {e}",
                holder.path, held.line
            ),
        })?;
        let found = usize::try_from(head.seq).ok().and_then(|i| owner_records.get(i));
        let ok = found.is_some_and(|r| hex::encode(r.parsed.hash) == head.hash);
        if !ok {
            let what = match found {
                None => format!(
                    "has no seq {} (last is seq {}): it was cut back",
                    head.seq, owner.head.seq
                ),
                Some(r) => format!(
                    "line {} (seq {}) differs from what its host signed: history was rewritten",
                    r.line, head.seq
                ),
            };
            return Err(VerifyError::Disagree {
                migration_id: mid,
                why: format!(
                    "{} line {} holds {}'s signed log_head; {} {what}",
                    holder.path, held.line, owner.host, owner.path
                ),
            });
        }
    }
    Ok(())
}

fn bodies<'a>(
    index: &'a BTreeMap<MsgKey, Held>,
    mid: &str,
    kind: &str,
) -> Vec<(&'a str, &'a Held)> {
    index
        .iter()
        .filter(|((k, _), h)| k == kind && h.migration.as_deref() == Some(mid))
        .map(|((_, b), h)| (b.as_str(), h))
        .collect()
}

fn check_migration(
    mid: &str,
    src: &LogSummary,
    src_index: &BTreeMap<MsgKey, Held>,
    dst: &LogSummary,
    dst_index: &BTreeMap<MsgKey, Held>,
    warnings: &mut Vec<String>,
) -> Result<MigrationCheck, VerifyError> {
    let disagree = |why: String| VerifyError::Disagree { migration_id: mid.to_owned(), why };
    let mut agreed = Vec::new();
    let mut signers: BTreeMap<&str, String> = BTreeMap::new();
    let groups = PROTOCOL_KINDS.iter().flat_map(|&kind| {
        let (in_src, in_dst) = (bodies(src_index, mid, kind), bodies(dst_index, mid, kind));
        if kind != "abort" {
            return vec![(kind, in_src, in_dst)];
        }
        // Each side's Abort is compared with the same side's.
        let mut by: BTreeMap<&str, (Vec<_>, Vec<_>)> = BTreeMap::new();
        for (i, list) in [in_src, in_dst].into_iter().enumerate() {
            for m in list {
                let slot = by.entry(m.1.signer.as_str()).or_default();
                if i == 0 {
                    slot.0.push(m)
                } else {
                    slot.1.push(m)
                }
            }
        }
        by.into_values().map(|(a, b)| (kind, a, b)).collect()
    });
    for (kind, in_src, in_dst) in groups {
        for (log, found) in [(src, &in_src), (dst, &in_dst)] {
            // SECURITY: two different signed Commits (or Offers, ...) for one
            // migration is equivocation, whoever signed them.
            if found.len() > 1 {
                let lines: Vec<String> =
                    found.iter().map(|(_, h)| format!("line {}", h.line)).collect();
                return Err(disagree(format!(
                    "{} holds {} different {kind:?} messages ({})",
                    log.path,
                    found.len(),
                    lines.join(", ")
                )));
            }
        }
        match (in_src.first(), in_dst.first()) {
            (Some((a, ha)), Some((b, hb))) => {
                if a != b {
                    return Err(disagree(format!(
                        "the {kind:?} in {} line {} differs from the one in {} line {}",
                        src.path, ha.line, dst.path, hb.line
                    )));
                }
                agreed.push(kind.to_owned());
                signers.insert(kind, ha.signer.clone());
            }
            (Some((_, h)), None) | (None, Some((_, h))) => {
                signers.insert(kind, h.signer.clone());
            }
            (None, None) => {}
        }
    }
    // SECURITY: who signs what is fixed by the protocol; a Receipt signed by
    // the source would let a source vouch for its own migration.
    let source = signers.get("offer").cloned();
    let destination = signers.get("accept").cloned();
    let roles = SIGNED_BY_SOURCE
        .iter()
        .map(|k| (*k, &source, "the Offer's signer"))
        .chain(SIGNED_BY_DESTINATION.iter().map(|k| (*k, &destination, "the Accept's signer")));
    for (kind, expected, who) in roles {
        if let (Some(s), Some(e)) = (signers.get(kind), expected) {
            if s != e {
                return Err(disagree(format!("the {kind:?} is signed by {s}, not by {who} {e}")));
            }
        }
    }
    if let (Some(s), Some(d)) = (&source, &destination) {
        if s == d {
            return Err(disagree(format!("Offer and Accept are both signed by {s}")));
        }
    }
    for (kind, signer) in &signers {
        if signer != &src.host && signer != &dst.host {
            return Err(disagree(format!(
                "the {kind:?} is signed by {signer}, neither {} nor {}",
                src.host, dst.host
            )));
        }
    }
    let outcome = if signers.contains_key("receipt") {
        "completed"
    } else if signers.contains_key("abort") {
        "aborted"
    } else {
        "unfinished"
    };
    if signers.contains_key("receipt") && !agreed.iter().any(|k| k == "receipt") {
        warnings.push(format!(
            "migration {mid}: only one log holds the Receipt; the other host never recorded it \
             (in doubt, or that log was cut at its tail; not provable from these logs)"
        ));
    }
    Ok(MigrationCheck {
        migration_id: mid.to_owned(),
        source,
        destination,
        agreed,
        outcome: outcome.into(),
    })
}
