//! R6 (non-repudiation) attacked for real: audit logs edited, cut,
//! reordered or truncated make `ferry audit verify` fail naming the record;
//! evidence bundles with a forged or swapped signature fail; and with the
//! audit log's file system full, on either side, the migration is refused
//! before any VM byte moves and the VM keeps running where it was.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ------------------------------------------------------------------ audit logs

fn verify(logs: &[&Path], ca: &str) -> (bool, String) {
    let mut args = vec!["audit", "verify"];
    args.extend(logs.iter().map(|p| p.to_str().expect("utf8")));
    args.extend(["--ca", ca]);
    let o = run(&args, None);
    (o.status.success(), text(&o))
}

/// Log lines with their newlines.
fn lines_of(path: &Path) -> Vec<Vec<u8>> {
    let bytes = std::fs::read(path).expect("log");
    bytes.split_inclusive(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// Change one byte of line `k` (1-based) to another character of the same
/// class, so the line stays well-formed JSON and the tampering must be
/// caught by the chain or a signature.
fn edit_byte(lines: &mut [Vec<u8>], k: usize) -> usize {
    let line = &mut lines[k - 1];
    let mid = line.len() / 2;
    let at = (mid..line.len())
        .chain(0..mid)
        .find(|&i| line[i].is_ascii_alphanumeric())
        .expect("an alphanumeric byte");
    line[at] = match line[at] {
        b'0'..=b'8' | b'a'..=b'y' | b'A'..=b'Y' => line[at] + 1,
        b'9' => b'0',
        b'z' => b'a',
        _ => b'A',
    };
    at
}

/// Editing, deleting, reordering or truncating any record of a real audit
/// log makes `ferry audit verify` fail and name the record; the untouched
/// logs verify and agree with each other; a log cut back to a record
/// boundary passes alone but not against its peer's log; an evidence bundle
/// verifies offline and fails with a forged or swapped signature.
#[test]
fn tampered_audit_logs_and_evidence_fail_verification() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    lab.start_guest("host1", "g", 256, "fill_mib=16 dirty=4 hb_ms=10");
    let rec = migrate_ok(&lab);
    let id = rec["id"].as_str().expect("id").to_owned();
    let ca = ca(&lab);
    let (src, dst) = (audit_log(&lab, "host1"), audit_log(&lab, "host2"));
    let work = lab.dir.path().join("audit-copies");
    std::fs::create_dir_all(&work).expect("mkdir");

    // Untouched: each log verifies and the two agree on the migration.
    for log in [&src, &dst] {
        let (ok, out) = verify(&[log], ca);
        assert!(ok, "an untouched log does not verify: {out}");
    }
    let v = verify_both_audit_logs(&lab);
    let checked = v["cross_check"]["migrations"].as_array().expect("migrations");
    assert!(
        checked.iter().any(|m| m["migration_id"] == id.as_str()),
        "the cross-check does not cover {id}: {v}"
    );
    eprintln!("untouched logs verify; cross-check: {}", v["cross_check"]["migrations"]);

    let original = lines_of(&src);
    let n = original.len();
    assert!(n >= 5, "host1's log has only {n} records");
    let write = |name: &str, lines: &[Vec<u8>]| {
        let p = work.join(name);
        std::fs::write(&p, lines.concat()).expect("write copy");
        p
    };
    let must_fail = |name: &str, lines: &[Vec<u8>], line: usize| {
        let p = write(name, lines);
        let (ok, out) = verify(&[&p], ca);
        assert!(!ok, "{name}: a tampered log verifies: {out}");
        let seq = format!("line {line}");
        assert!(out.contains(&seq), "{name}: the error does not name {seq}: {out}");
        eprintln!(
            "{name}: {}",
            out.trim()
                .replace(&format!("{}: ", p.display()), "")
                .chars()
                .take(300)
                .collect::<String>()
        );
    };
    let mid = n / 2;
    for k in [1, 2, mid, n] {
        let mut l = original.clone();
        let at = edit_byte(&mut l, k);
        must_fail(&format!("edit line {k} byte {at}"), &l, k);
    }
    for k in [1, mid, n - 1] {
        let mut l = original.clone();
        l.remove(k - 1);
        must_fail(&format!("delete line {k}"), &l, k);
    }
    for k in [1, mid, n - 1] {
        let mut l = original.clone();
        l.swap(k - 1, k);
        must_fail(&format!("swap lines {k} and {}", k + 1), &l, k);
    }
    for cut in [1, original[n - 1].len() / 2, original[n - 1].len() - 1] {
        let mut l = original.clone();
        let last = l.last_mut().expect("last");
        last.truncate(last.len() - cut);
        must_fail(&format!("truncate the last line by {cut} bytes"), &l, n);
    }
    // Cut back to a record boundary before the commit: the log alone cannot
    // show it (no record is damaged), but host2's log witnessed host1's log
    // head in the signed commit, so the cross-check finds it.
    let commit_at = original
        .iter()
        .position(|l| {
            let v: Value = serde_json::from_slice(l).expect("line");
            v["record"]["event"]["kind"] == "commit_sent"
                && v["record"]["event"]["migration_id"] == id.as_str()
        })
        .expect("commit_sent record");
    let cut = write("cut-before-commit", &original[..commit_at]);
    let (ok, out) = verify(&[&cut], ca);
    assert!(ok, "a log cut at a record boundary should verify alone: {out}");
    let (ok, out) = verify(&[&cut, &dst], ca);
    assert!(!ok, "a source log cut back before its commit passes the cross-check: {out}");
    eprintln!(
        "cut before the commit: alone verifies; against host2's log: {}",
        out.trim().lines().last().unwrap_or("")
    );

    // Evidence bundle: verifies with only the CA certificate.
    let bundle = work.join("bundle.json");
    let o = run(
        &[
            "audit",
            "export",
            &id,
            "--log",
            src.to_str().expect("utf8"),
            "--log",
            dst.to_str().expect("utf8"),
            "--out",
            bundle.to_str().expect("utf8"),
        ],
        None,
    );
    assert!(o.status.success(), "export failed: {}", text(&o));
    let verify_bundle = |p: &Path| {
        let o =
            run(&["audit", "verify-bundle", p.to_str().expect("utf8"), "--ca", ca, "--json"], None);
        (o.status.success(), text(&o))
    };
    let (ok, out) = verify_bundle(&bundle);
    assert!(ok, "the evidence bundle does not verify: {out}");
    let summary: Value = serde_json::from_str(out.trim()).expect("summary");
    assert_eq!(summary["outcome"], "completed", "{summary}");
    assert_eq!(summary["messages"], json!(["offer", "accept", "commit", "receipt"]), "{summary}");
    eprintln!("bundle verifies: {summary}");
    let b: Value =
        serde_json::from_slice(&std::fs::read(&bundle).expect("bundle")).expect("bundle json");
    let kinds: Vec<&str> = b["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["kind"].as_str().expect("kind"))
        .collect();

    // Forged: one base64 character of the accept's signature changed.
    let mut forged = b.clone();
    let sig = forged["messages"][1]["signature"].as_str().expect("signature").to_owned();
    let mut chars: Vec<char> = sig.chars().collect();
    let at = chars.len() - 8;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    forged["messages"][1]["signature"] = json!(chars.into_iter().collect::<String>());
    let p = work.join("forged.json");
    std::fs::write(&p, forged.to_string()).expect("write");
    let (ok, out) = verify_bundle(&p);
    assert!(!ok, "a bundle with a forged signature verifies: {out}");
    assert!(
        out.contains(&format!("message #1 ({})", kinds[1])),
        "the error does not name the message: {out}"
    );
    eprintln!("forged accept signature: {}", out.trim());

    // Swapped: the offer's and the commit's signatures (same signer, so
    // only the signatures themselves can tell).
    let mut swapped = b.clone();
    let (s0, s2) =
        (swapped["messages"][0]["signature"].clone(), swapped["messages"][2]["signature"].clone());
    swapped["messages"][0]["signature"] = s2;
    swapped["messages"][2]["signature"] = s0;
    let p = work.join("swapped.json");
    std::fs::write(&p, swapped.to_string()).expect("write");
    let (ok, out) = verify_bundle(&p);
    assert!(!ok, "a bundle with swapped signatures verifies: {out}");
    assert!(
        out.contains(&format!("message #0 ({})", kinds[0])),
        "the error does not name the message: {out}"
    );
    eprintln!("swapped offer/commit signatures: {}", out.trim());
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}

// ------------------------------------------------------------------ audit full

/// A tmpfs of `size` mounted on `dir`, unmounted on drop.
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> TmpfsMount {
        std::fs::create_dir_all(dir).expect("mkdir");
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount");
        assert!(
            o.status.success(),
            "mount tmpfs on {} failed (are we root?): {}",
            dir.display(),
            text(&o)
        );
        TmpfsMount { dir: dir.to_owned() }
    }

    /// Fill the file system with a file until the kernel says ENOSPC.
    fn fill(&self) -> u64 {
        let mut f = std::fs::File::create(self.dir.join("filler")).expect("filler");
        let block = vec![0x55u8; 4096];
        let mut n = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
        let _ = f.sync_all();
        n
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Put `host`'s audit log on a 256 KiB tmpfs and restart its agent.
fn audit_on_tmpfs(lab: &TestLab, host: &str) -> (TmpfsMount, PathBuf) {
    let m = TmpfsMount::new(&lab.dir.path().join(format!("{host}-audit")), "256k");
    let log = m.dir.join("audit.log");
    append_config(lab, host, &format!("[audit]\nlog = \"{}\"", log.display()));
    lab.restart_agent(host);
    assert!(log.exists(), "{host}'s agent did not open its audit log on the tmpfs");
    (m, log)
}

fn page_slack(log: &Path) -> u64 {
    let len = std::fs::metadata(log).expect("audit log").len();
    (4096 - len % 4096) % 4096
}

/// One record in `host`'s audit log, written by that agent itself: a rogue
/// offer (by the other lab host, attested) for a VM whose kernel image does
/// not exist, logged as received, then refused at launch. Returns the
/// record's size.
fn rogue_record(lab: &TestLab, host: &str, log: &Path, cmdline_len: usize) -> u64 {
    let before = std::fs::metadata(log).expect("audit log").len();
    let from = if host == "host1" { "host2" } else { "host1" };
    let mut r = RogueSource::connect(lab, from, host).expect("connect as the other host");
    r.attest().expect("attest");
    let mut body = r.offer_body("e");
    body["spec"]["boot"] =
        json!({"type": "kernel", "kernel": "missing.elf", "cmdline": "x".repeat(cmdline_len)});
    r.send_offer(body).expect("offer");
    let why = refusal(&mut r);
    assert!(
        why.contains("cannot start the destination QEMU"),
        "padding offer refused for another reason: {why}"
    );
    std::fs::metadata(log).expect("audit log").len() - before
}

/// A file system bills whole pages (blocks): appending into the free tail
/// of the log's last page needs no space, so a "full" file system still
/// takes one small record. Pad `host`'s log with records of chosen sizes
/// until that tail is smaller than `below` bytes, so that the next record
/// of at least that size (the real Offer's) must allocate, and fail.
fn pad_log(lab: &TestLab, host: &str, log: &Path, below: u64) -> u64 {
    let base = rogue_record(lab, host, log, 1);
    for _ in 0..40 {
        let slack = page_slack(log);
        if slack < below {
            return slack;
        }
        let target = if slack >= base + 100 { slack - 100 } else { slack + 4096 - 100 };
        let extra = (target - base).min(2000) as usize;
        rogue_record(lab, host, log, 1 + extra);
    }
    panic!("could not pad {} below {below} bytes of page slack", log.display());
}

/// After a migration refused because an audit log is full: it failed naming
/// the audit log, no VM byte moved, host2 holds no VM and no QEMU, and the
/// VM runs on host1 (heartbeats moving); the full log is still intact.
fn assert_refused_before_any_byte(
    lab: &TestLab,
    vm_log: &Path,
    full_log: &Path,
    ok: bool,
    out: &str,
) {
    assert!(!ok, "a migration with a full audit log succeeded: {out}");
    let lower = out.to_lowercase();
    assert!(lower.contains("audit log"), "the error does not name the audit log: {out}");
    assert!(lower.contains("no space left"), "the error does not say why: {out}");
    assert_eq!(lab.vm_state("host1", "g").as_deref(), Some("running"), "{out}");
    assert_guest_runs(vm_log);
    assert_eq!(lab.running_on("g"), ["host1"]);
    wait_until(Duration::from_secs(15), "no QEMU on host2", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    assert!(lab.vms("host2").is_empty(), "host2 holds a VM");
    for host in ["host1", "host2"] {
        for (id, state, bytes, _) in migration_records(lab, host) {
            assert_eq!(bytes, 0, "{host} recorded {bytes} VM bytes for {id} ({state})");
            assert_eq!(state, "aborted", "{host}: migration {id} is {state}");
        }
    }
    // The failed append left no torn record behind.
    let (ok, v) = verify(&[full_log], lab.lab.ca.to_str().expect("utf8"));
    assert!(ok, "the full audit log no longer verifies: {v}");
}

/// The destination's audit log cannot be written (its file system is
/// full): the migration is refused before any VM byte moves; the VM keeps
/// running on the source. Then, with space again, it migrates.
#[test]
fn a_full_destination_audit_log_refuses_the_migration() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=16 dirty=4 hb_ms=10");
    let log = console_path(&vm);
    let (mount, audit) = audit_on_tmpfs(&lab, "host2");
    // The real Offer's record is larger than a padding record (longer
    // command line): it cannot fit in what is left of the last page.
    let slack = pad_log(&lab, "host2", &audit, 1000);
    let filled = mount.fill();
    let (ok, out) = try_migrate(&lab);
    eprintln!("host2's audit log padded to {slack} bytes before a page end, tmpfs filled with {filled} bytes; migrate: {}", out.trim());
    assert_refused_before_any_byte(&lab, &log, &audit, ok, &out);
    // The very first record of the migration failed: host2 refused the
    // offer before launching anything.
    assert!(out.contains("(offer_received)"), "not refused at the offer: {out}");
    let h2_log =
        String::from_utf8_lossy(&std::fs::read(&lab.host("host2").log).unwrap_or_default())
            .into_owned();
    let refused = h2_log.lines().rev().find(|l| l.contains("refusing migration")).unwrap_or("");
    assert!(
        refused.contains("cannot write the audit record (offer_received)"),
        "host2's log does not show the audit refusal:\n{h2_log}"
    );
    eprintln!("host2: {}", refused.trim());

    // Space again: the same migration goes through. (The padding's offers
    // used up host1's admission window at host2, and a restart no longer
    // resets it, so host2 restarts with a larger window; the source-side
    // test shows the log recovering without a restart.)
    std::fs::remove_file(mount.dir.join("filler")).expect("rm filler");
    lab.edit_config("host2", "vm_cooldown = \"0s\"", "vm_cooldown = \"0s\"\nper_peer_max = 1000");
    lab.restart_agent("host2");
    let (ok, out) = try_migrate(&lab);
    assert!(ok, "with space in host2's audit log the migration failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    let (ok, v) = verify(&[&audit], lab.lab.ca.to_str().expect("utf8"));
    assert!(ok, "{v}");
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}

/// The source's audit log cannot be written: the Offer is never sent, the
/// VM keeps running on the source, the destination launches nothing. Then,
/// with space again and the log reopened, it migrates.
#[test]
fn a_full_source_audit_log_refuses_the_migration() {
    let _g = serial();
    let t0 = Instant::now();
    let lab = TestLab::up(2, 0);
    let (mount, audit) = audit_on_tmpfs(&lab, "host1");
    let vm = lab.start_guest("host1", "g", 256, "fill_mib=16 dirty=4 hb_ms=10");
    let log = console_path(&vm);
    let slack = pad_log(&lab, "host1", &audit, 1000);
    let h2_log_before = std::fs::metadata(&lab.host("host2").log).map(|m| m.len()).unwrap_or(0);
    let filled = mount.fill();
    let (ok, out) = try_migrate(&lab);
    eprintln!("host1's audit log padded to {slack} bytes before a page end, tmpfs filled with {filled} bytes; migrate: {}", out.trim());
    assert_refused_before_any_byte(&lab, &log, &audit, ok, &out);
    // The Offer was never sent: its record is written before it leaves.
    assert!(out.contains("(offer_sent)"), "not refused at the offer: {out}");
    let h2_log = String::from_utf8_lossy(
        &std::fs::read(&lab.host("host2").log).unwrap_or_default()[h2_log_before as usize..],
    )
    .into_owned();
    assert!(!h2_log.contains("launching QEMU"), "host2 launched a QEMU:\n{h2_log}");
    assert!(
        h2_log.contains("no offer after attestation"),
        "host2 did not see the source give up after attesting:\n{h2_log}"
    );
    assert!(
        migration_records(&lab, "host2")
            .iter()
            .all(|(_, _, _, e)| e.contains("missing.elf") || e.contains("cannot start")),
        "host2 recorded the refused migration"
    );

    // Space freed: the same agent, without a restart, records and migrates again.
    std::fs::remove_file(mount.dir.join("filler")).expect("rm filler");
    let (ok, out) = try_migrate(&lab);
    assert!(ok, "with space in host1's audit log the migration failed: {out}");
    assert_eq!(lab.running_on("g"), ["host2"]);
    eprintln!("whole test {} ms", t0.elapsed().as_millis());
}
