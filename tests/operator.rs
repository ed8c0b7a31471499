//! Operator experience, driven through the real binary: the live progress
//! display on a terminal, every --json output, and cancelling a migration.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// `ferry migrate` under an 80-column pseudo-terminal (util-linux `script`,
/// sized by `stty`): the bar is redrawn in place, never wider than the
/// terminal (a wider line wraps and every redraw scrolls), and the command
/// ends with a clear result.
#[test]
fn progress_is_drawn_on_a_terminal_and_ends_in_a_result() {
    let lab = TestLab::up(2, 64);
    lab.start_guest("host1", "g", 256, "fill_mib=128 dirty=0 hb_ms=10");
    let cmd = format!("stty cols 80 rows 24 && exec {FERRY} migrate g --to host2 --host host1");
    let o = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("FERRY_CLIENT_CONFIG", &lab.lab.client_config)
        .env("TERM", "xterm")
        .stdin(Stdio::null())
        .output()
        .expect("script");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}");
    let redraws = out.matches("\r\x1b[2K").count();
    assert!(redraws >= 3, "the bar was not redrawn in place ({redraws} times): {out:?}");
    assert!(
        out.contains("transfer")
            && out.contains('%')
            && out.contains("MiB/s")
            && out.contains("ETA"),
        "{out:?}"
    );
    // Each redraw runs to the next carriage return or newline.
    for drawn in out.split("\r\x1b[2K").skip(1) {
        let line = drawn.split(['\r', '\n']).next().unwrap_or("");
        assert!(line.len() < 80, "{} columns on an 80-column terminal: {line:?}", line.len());
    }
    // After the last redraw of the bar comes the result, on lines of its own.
    let after_bar = out.rsplit("\r\x1b[2K").next().unwrap_or("");
    let result = after_bar.split_once('\n').map(|x| x.1).unwrap_or("");
    assert!(result.contains(": Completed"), "no clear result after the bar: {result:?}");
    // A reader that closed its end before the result (`| head -c 300`): the
    // command ends quietly with the migration's own status.
    let o =
        with_closed_stdout(&lab, &["--json", "migrate", "g", "--to", "host1", "--host", "host2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
    assert_eq!(lab.running_on("g"), ["host1"]);
    // Not a terminal: no control characters, one line per phase.
    let o = lab.ferry(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains('\x1b') && err.contains("phase transfer"), "{err}");
}

/// Runs ferry with stdout a pipe whose reader is already gone, so that its
/// first write meets a closed pipe (EPIPE), as after `| head -c 300`.
fn with_closed_stdout(lab: &TestLab, args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    Command::new(FERRY)
        .args(args)
        .env("FERRY_CLIENT_CONFIG", &lab.lab.client_config)
        .stdin(Stdio::null())
        .stdout(writer)
        .output()
        .expect("run ferry")
}

/// The same for commands that need no lab; `/dev/full` stands for output
/// that was wanted and lost.
#[test]
fn a_closed_stdout_ends_any_command_quietly_and_a_full_one_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let ca = ca.to_str().expect("utf8");
    let closed = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        let o = Command::new(FERRY).args(args).stdout(writer).output().expect("run ferry");
        assert!(!text(&o).contains("panicked"), "{args:?}: {}", text(&o));
        o
    };
    assert!(closed(&["completions", "bash"]).status.success());
    assert!(closed(&["--help"]).status.success());
    let init = ["--json", "ca", "init", "--dir", ca, "--domain", "ferry.test"];
    assert!(closed(&init).status.success());
    assert!(dir.path().join("ca/ca.pem").exists(), "the command stopped short");
    // A failing command keeps its own status.
    let again = closed(&init);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));

    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").expect("/dev/full");
    let o = Command::new(FERRY).args(["completions", "bash"]).stdout(full).output().expect("run");
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("cannot write to stdout"), "{}", text(&o));
}

fn has(v: &serde_json::Value, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "JSON lacks {f}: {v}");
    }
}

#[test]
fn every_json_output_parses_and_has_its_fields() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "g", 128, "fill_mib=16 dirty=0 hb_ms=50");
    has(&vm, &["name", "state", "pid", "accel", "memory_mib", "vcpus", "console_log"]);
    let (ok, s) = lab.ferry_json(&["status", "--host", "host1"]);
    assert!(ok);
    has(&s, &["host", "version", "protocol", "accel", "vms", "peers", "active_migrations"]);
    assert_eq!(
        s["accel"],
        if std::path::Path::new("/sys/module/kvm_intel").exists()
            || std::path::Path::new("/sys/module/kvm_amd").exists()
        {
            "kvm"
        } else {
            "tcg"
        }
    );
    let (ok, l) = lab.ferry_json(&["vm", "list", "--host", "host1"]);
    assert!(ok);
    has(&l["vms"][0], &["name", "state", "pid", "migration", "console_log"]);
    let (ok, m) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok);
    has(
        &m,
        &[
            "id",
            "role",
            "vm",
            "source",
            "destination",
            "state",
            "bytes",
            "digest",
            "total_ms",
            "qemu_downtime_ms",
            "setup_ms",
            "attestation",
            "insecure",
            "receipt",
        ],
    );
    let id = m["id"].as_str().expect("id");
    let (ok, list) = lab.ferry_json(&["migrations", "list", "--host", "host2"]);
    assert!(ok);
    has(&list["migrations"][0], &["id", "role", "state"]);
    let (ok, show) = lab.ferry_json(&["migrations", "show", id, "--host", "host2"]);
    assert!(ok && show["role"] == "destination", "{show}");
    let v = verify_both_audit_logs(&lab);
    has(&v, &["verified", "logs", "cross_check"]);
    let (ok, p) = lab.ferry_json(&[
        "policy",
        "check",
        lab.dir.path().join("policy/ferry.cedar").to_str().expect("utf8"),
    ]);
    assert!(ok);
    has(&p, &["valid", "policies", "warnings"]);
    // Errors are JSON too, with a kind for scripts.
    let (ok, e) = lab.ferry_json(&["migrate", "nope", "--to", "host2", "--host", "host1"]);
    assert!(!ok);
    has(&e, &["kind", "message"]);
}

#[test]
fn a_migration_can_be_cancelled_before_commit() {
    let lab = TestLab::up(2, 32);
    let vm = lab.start_guest("host1", "g", 384, "fill_mib=256 dirty=16 hb_ms=10");
    let log = std::path::PathBuf::from(vm["console_log"].as_str().expect("log"));
    let child = Command::new(FERRY)
        .args(["migrate", "g", "--to", "host2", "--host", "host1", "--json"])
        .env("FERRY_CLIENT_CONFIG", &lab.lab.client_config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut id = String::new();
    wait_until(Duration::from_secs(30), "the transfer to start", || {
        let (_, l) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
        match l["migrations"].as_array().and_then(|a| a.first()) {
            Some(m) if m["state"] == "transferring" => {
                id = m["id"].as_str().unwrap_or_default().to_owned();
                true
            }
            _ => false,
        }
    });
    // Both halves, held by the migration, can still be read, and what is
    // read is the migration under way.
    let (ok, m) = lab.ferry_json(&["vm", "qmp", "g", "query-migrate", "--host", "host1"]);
    assert!(ok && m["result"]["status"] == "active", "{m}");
    let (ok, s) = lab.ferry_json(&["vm", "qmp", "g", "query-status", "--host", "host2"]);
    assert!(ok && s["result"]["status"] == "inmigrate", "{s}");
    std::thread::sleep(Duration::from_millis(500));
    let (ok, c) = lab.ferry_json(&["migrations", "cancel", &id, "--host", "host1"]);
    assert!(ok, "{c}");
    let o = child.wait_with_output().expect("migrate");
    assert!(!o.status.success(), "the migration completed anyway");
    assert!(text(&o).contains("cancelled"), "{}", text(&o));
    assert_eq!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    assert_guest_runs(&log);
    wait_until(Duration::from_secs(10), "host2 to discard the incoming VM", || {
        live_qemus_under(&lab.host("host2").state_dir).is_empty()
    });
    let (ok, e) = lab.ferry_json(&["migrations", "cancel", &id, "--host", "host1"]);
    assert!(
        !ok && e["message"]
            .as_str()
            .unwrap_or("")
            .contains("not an outgoing migration in progress"),
        "{e}"
    );
}

/// `ferry vm qmp` passes read-only QMP commands to the VM's QEMU (whose only
/// QMP socket the agent holds) and refuses any that would act on it.
#[test]
fn vm_qmp_reads_a_vm_and_refuses_to_steer_it() {
    let lab = TestLab::up(1, 0);
    let vm = lab.start_guest("host1", "g", 64, "fill_mib=8 dirty=0 hb_ms=50");
    let log = std::path::PathBuf::from(vm["console_log"].as_str().expect("log"));
    let qmp = |args: &[&str]| {
        let mut a = vec!["vm", "qmp", "g", "--host", "host1"];
        a.extend_from_slice(args);
        lab.ferry_json(&a)
    };
    let (ok, s) = qmp(&["query-status"]);
    assert!(ok && s["type"] == "qmp" && s["result"]["status"] == "running", "{s}");
    let (ok, l) = qmp(&["qom-list", "--args", r#"{"path": "/machine"}"#]);
    assert!(ok && l["result"].as_array().is_some_and(|a| !a.is_empty()), "{l}");
    for act in ["stop", "quit", "system_reset", "human-monitor-command", "qom-set"] {
        let (ok, e) = qmp(&[act]);
        let message = e["message"].as_str().unwrap_or("");
        assert!(!ok && e["kind"] == "denied", "{act} was not refused: {e}");
        assert!(message.contains("allowed: query-*, qom-list, qom-list-types"), "{e}");
    }
    let (ok, e) = qmp(&["query-status", "--args", "[1]"]);
    assert!(!ok && text_of(&e).contains("not a JSON object"), "{e}");
    let (ok, e) = qmp(&["query-no-such-thing"]);
    assert!(!ok && e["kind"] == "request" && text_of(&e).contains("CommandNotFound"), "{e}");
    // Nothing above reached the VM: it still runs, and its guest still ticks.
    let (ok, s) = qmp(&["query-status"]);
    assert!(ok && s["result"]["status"] == "running", "{s}");
    assert_eq!(lab.vm_state("host1", "g").as_deref(), Some("running"));
    assert_guest_runs(&log);
}

fn text_of(v: &serde_json::Value) -> String {
    v.get("message")
        .or_else(|| v.get("error"))
        .map(|m| m.to_string())
        .unwrap_or_else(|| v.to_string())
}
