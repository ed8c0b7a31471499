//! Post-copy, end to end: a guest that dirties memory faster than pre-copy
//! can send it does not converge, and moves with `--postcopy`; the
//! destination runs it only after the source's signed switchover commit;
//! policy and the multifd rule refuse it before anything moves.

mod common;

use std::time::Duration;

use common::*;

/// The fast guest dirties 256 pages (1 MiB) per ms, far more than the
/// 100 MiB/s the lab's link allows, so pre-copy never catches up.
const FAST: &str = "fill_mib=256 dirty=256 hb_ms=1";
const LINK_MIB_S: u64 = 100;

#[test]
fn a_guest_that_outruns_precopy_moves_with_postcopy() {
    let lab = TestLab::up(2, LINK_MIB_S);
    // Pre-copy gets 8 s, then gives up and resumes the source copy.
    lab.edit_config("host1", "[policy]", "[migration]\nmax_transfer_ms = 8000\n\n[policy]");
    lab.restart_agent("host1");
    let src = lab.start_guest("host1", "fast", 512, FAST);
    let src_pid = src["pid"].as_i64().expect("pid") as i32;

    let (ok, failed) = lab.ferry_json(&["migrate", "fast", "--to", "host2", "--host", "host1"]);
    assert!(!ok, "pre-copy of the fast guest should not converge: {failed}");
    assert!(failed["message"].as_str().unwrap_or("").contains("did not converge"), "{failed}");
    assert_eq!(lab.running_on("fast"), ["host1"], "the source copy runs again");

    let (ok, rec) =
        lab.ferry_json(&["migrate", "fast", "--to", "host2", "--host", "host1", "--postcopy"]);
    assert!(ok, "post-copy migration failed: {rec}");
    assert_eq!(rec["state"], "completed", "{rec}");
    assert_eq!(rec["postcopy"], true, "{rec}");
    let id = rec["id"].as_str().expect("id").to_owned();
    let (_, dst) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert_eq!(dst["state"], "completed", "{dst}");
    assert_eq!(
        (&dst["bytes"], &dst["digest"]),
        (&rec["bytes"], &rec["digest"]),
        "both sides signed for the same stream"
    );
    assert!(rec["receipt"].is_object(), "{rec}");
    assert_eq!(lab.running_on("fast"), ["host2"]);
    wait_until(Duration::from_secs(10), "source QEMU to exit", || !pid_alive(src_pid));

    // The switchover is in both audit logs: commit sent before the
    // destination resumed, receipt after.
    let logs = [
        lab.host("host1").state_dir.join("audit.log"),
        lab.host("host2").state_dir.join("audit.log"),
    ];
    for (log, kinds) in
        logs.iter().zip([["commit_sent", "receipt_received"], ["commit_received", "receipt_sent"]])
    {
        let o = lab.ferry(&[
            "audit",
            "show",
            log.to_str().expect("utf8"),
            "--migration",
            &id,
            "--json",
        ]);
        let records = text(&o);
        for kind in kinds {
            let switchover = records
                .lines()
                .any(|l| l.contains(&format!("\"{kind}\"")) && l.contains("\"switchover\""));
            assert!(switchover, "no switchover {kind} in {}: {records}", log.display());
        }
    }
    verify_both_audit_logs(&lab);

    // The guest kept running with its memory intact: every page it had not
    // yet received was fetched from the source on demand.
    assert_moved_intact(&lab, "fast", &id);
}

/// Host1 reaches host2 only through a proxy that can cut the link; the
/// given `[migration]` settings go into host1's config.
fn lab_with_cuttable_link(migration: &str) -> (TestLab, Proxy) {
    let lab = TestLab::up(2, LINK_MIB_S);
    let proxy = Proxy::start(lab.host("host2").addr, ProxyMode::CutAfter(u64::MAX));
    lab.route_peer("host1", "host2", proxy.addr);
    lab.edit_config("host1", "[policy]", &format!("[migration]\n{migration}\n\n[policy]"));
    lab.restart_agent("host1");
    (lab, proxy)
}

/// Start a post-copy migration of a fast guest and cut the link once the
/// destination has taken over. Returns what `ferry migrate` answered, the
/// source QEMU's pid and the migration id.
fn cut_after_handover(lab: &TestLab, proxy: &Proxy) -> (serde_json::Value, i32, String) {
    let src = lab.start_guest("host1", "fast", 512, FAST);
    let src_pid = src["pid"].as_i64().expect("pid") as i32;
    let child = lab.spawn_postcopy_to_host2("fast");
    // The post-copy phase sends what is left at the link's 100 MiB/s: the
    // link fails while the destination runs the VM and still lacks pages.
    wait_until(Duration::from_secs(90), "the hand-over", || {
        lab.only_migration_state("host1") == "postcopy_active"
    });
    proxy.cut();
    let out = child.wait_with_output().expect("wait migrate");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(!out.status.success(), "{v}");
    assert_eq!(v["kind"], "in_doubt", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("Do not stop either QEMU"), "{v}");
    let (_, list) = lab.ferry_json(&["migrations", "list", "--host", "host1"]);
    let id = list["migrations"][0]["id"].as_str().expect("id").to_owned();
    (v, src_pid, id)
}

#[test]
fn a_link_lost_after_the_handover_keeps_both_halves_until_recovered() {
    // Automatic recovery off: this is the operator's path.
    let (lab, proxy) = lab_with_cuttable_link("postcopy_recover_retry_ms = 0");
    let (_, src_pid, id) = cut_after_handover(&lab, &proxy);
    let state = |host: &str| lab.only_migration_state(host);

    // Neither half was stopped or resumed, now or after both agents restart.
    let dst_pid = || {
        lab.vms("host2")
            .iter()
            .find(|v| v["name"] == "fast")
            .and_then(|v| v["pid"].as_i64())
            .unwrap_or(0) as i32
    };
    wait_until(Duration::from_secs(20), "the destination to record the interruption", || {
        state("host2") == "postcopy_active"
    });
    let dst = dst_pid();
    assert!(dst != 0 && pid_alive(dst), "the destination's half is gone");
    // The link comes back (no proxy); both agents restart meanwhile.
    lab.unroute_peer("host1", "host2", proxy.addr);
    for host in ["host1", "host2"] {
        lab.restart_agent(host);
    }
    assert!(pid_alive(src_pid), "the source's half (holding pages) was stopped");
    assert_eq!(dst_pid(), dst, "the destination's half was replaced");
    assert!(pid_alive(dst));
    assert_eq!(
        (state("host1"), state("host2")),
        ("postcopy_active".into(), "postcopy_active".into())
    );
    assert_ne!(
        lab.vm_state("host1", "fast").as_deref(),
        Some("running"),
        "the source copy was resumed: the VM would run twice"
    );
    // Recovery only from the source, and only by the source host.
    let (ok, v) = lab.ferry_json(&["migrations", "recover", &id, "--host", "host2"]);
    assert!(!ok && v["kind"] == "request", "{v}");

    // Resumed over a new connection: the rest of the pages arrive and the
    // guest, which stalled on them, runs on with its memory intact.
    let (ok, rec) = lab.ferry_json(&["migrations", "recover", &id, "--host", "host1"]);
    assert!(ok, "recovery failed: {rec}");
    assert_eq!(rec["state"], "completed", "{rec}");
    let (_, d) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert_eq!(d["state"], "completed", "{d}");
    wait_until(Duration::from_secs(10), "source QEMU to exit", || !pid_alive(src_pid));
    assert_eq!(lab.running_on("fast"), ["host2"]);
    assert_moved_intact(&lab, "fast", &id);
    verify_both_audit_logs(&lab);
}

/// With automatic recovery on, attempts while the link is down fail and
/// change nothing; once it is back the source resumes the stream by itself,
/// also after its agent restarted in between.
#[test]
fn the_source_resumes_an_interrupted_postcopy_by_itself_once_the_link_is_back() {
    let (lab, proxy) = lab_with_cuttable_link("postcopy_recover_retry_ms = 500");
    let (v, src_pid, id) = cut_after_handover(&lab, &proxy);
    assert!(v["message"].as_str().unwrap_or("").contains("resumes it on its own"), "{v}");
    let dst_pid = lab
        .vms("host2")
        .iter()
        .find(|v| v["name"] == "fast")
        .and_then(|v| v["pid"].as_i64())
        .expect("destination half") as i32;

    // Attempts at 0.5, 1.5 and 3.5 s all meet the cut link.
    lab.wait_failed_recoveries("host1", 2);
    assert!(
        metric(&scrape(lab.host("host1").metrics), "ferry_postcopy_recovery_failures_total") >= 2
    );
    assert!(pid_alive(src_pid) && pid_alive(dst_pid), "a half was stopped while the link was down");
    assert_ne!(
        lab.vm_state("host1", "fast").as_deref(),
        Some("running"),
        "the source copy was resumed: the VM would run twice"
    );

    // The source agent restarts meanwhile: the new one takes up the retries.
    lab.restart_agent("host1");
    assert_eq!(lab.only_migration_state("host1"), "postcopy_active");
    assert!(pid_alive(src_pid), "the restart stopped the source's half");
    proxy.heal();
    wait_until(Duration::from_secs(90), "recovery on both hosts", || {
        lab.only_migration_state("host1") == "completed"
            && lab.only_migration_state("host2") == "completed"
    });
    wait_until(Duration::from_secs(10), "source QEMU to exit", || !pid_alive(src_pid));
    assert_eq!(lab.running_on("fast"), ["host2"]);
    assert_moved_intact(&lab, "fast", &id);
    verify_both_audit_logs(&lab);
}

#[test]
fn postcopy_is_refused_by_policy_and_with_multifd() {
    let lab = TestLab::up(2, 0);
    // The sample policy allows post-copy only up to security level 1.
    let o = lab.ferry(&[
        "vm",
        "start",
        "--host",
        "host1",
        "--name",
        "secret",
        "--kernel",
        "ferry-guest.elf",
        "--cmdline",
        "fill_mib=16 hb_ms=10",
        "--security-level",
        "2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let (ok, v) =
        lab.ferry_json(&["migrate", "secret", "--to", "host2", "--host", "host1", "--postcopy"]);
    assert!(!ok);
    assert_eq!(v["kind"], "denied", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("post-copy is allowed only"), "{v}");
    // Without post-copy the same VM may move: it was post-copy that was refused.
    let (ok, v) = lab.ferry_json(&["migrate", "secret", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{v}");

    let (ok, v) = lab.ferry_json(&[
        "migrate",
        "secret",
        "--to",
        "host1",
        "--host",
        "host2",
        "--postcopy",
        "--streams",
        "2",
    ]);
    assert!(!ok);
    assert_eq!(v["kind"], "request", "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("multifd"), "{v}");
    assert_eq!(lab.running_on("secret"), ["host2"]);
}

#[test]
fn a_guest_that_converges_anyway_completes_with_postcopy_allowed() {
    // Post-copy allowed, but an idle guest converges in pre-copy: it never
    // takes post-copy's risk, and QEMU's return path is relayed to the end.
    let lab = TestLab::up(2, 0);
    let src = lab.start_guest("host1", "calm", 256, "fill_mib=64 dirty=0 hb_ms=10");
    let src_pid = src["pid"].as_i64().expect("pid") as i32;
    let (ok, rec) =
        lab.ferry_json(&["migrate", "calm", "--to", "host2", "--host", "host1", "--postcopy"]);
    assert!(ok, "{rec}");
    assert_eq!(rec["state"], "completed", "{rec}");
    let (_, dst) =
        lab.ferry_json(&["migrations", "show", rec["id"].as_str().expect("id"), "--host", "host2"]);
    assert_eq!(
        (&dst["state"], &dst["digest"]),
        (&serde_json::json!("completed"), &rec["digest"]),
        "{dst}"
    );
    wait_until(Duration::from_secs(10), "source QEMU to exit", || !pid_alive(src_pid));
    assert_eq!(lab.running_on("calm"), ["host2"]);
    let log = lab.host("host1").state_dir.join("audit.log");
    let records = text(&lab.ferry(&[
        "audit",
        "show",
        log.to_str().expect("utf8"),
        "--migration",
        rec["id"].as_str().expect("id"),
        "--json",
    ]));
    assert!(
        records.contains("commit_sent") && !records.contains("\"switchover\""),
        "a converging guest switched to post-copy: {records}"
    );
    verify_both_audit_logs(&lab);
}

/// The source's QEMU dies while the link is down: the pages only it held
/// are gone. The source agent records that by itself (`postcopy_lost`,
/// audited, counted) instead of retrying forever; once the link is back it
/// tells the destination, which releases its frozen half to the operator:
/// nothing is stopped or resumed on its own, and `vm stop` works there.
#[test]
fn losing_the_source_qemu_ends_the_postcopy_as_lost_on_both_sides() {
    let (lab, proxy) = lab_with_cuttable_link("postcopy_recover_retry_ms = 500");
    let (_, src_pid, id) = cut_after_handover(&lab, &proxy);
    let dst_pid = lab
        .vms("host2")
        .iter()
        .find(|v| v["name"] == "fast")
        .and_then(|v| v["pid"].as_i64())
        .expect("destination half") as i32;
    let _ = std::process::Command::new("kill").args(["-9", &src_pid.to_string()]).status();
    wait_until(Duration::from_secs(30), "host1 to record the lost half", || {
        lab.only_migration_state("host1") == "postcopy_lost"
    });
    // While the link is down host2 keeps its half exactly as it is.
    assert_eq!(lab.only_migration_state("host2"), "postcopy_active");
    assert!(pid_alive(dst_pid), "the destination's half was stopped");
    assert!(
        lab.vms("host1").iter().all(|v| v["name"] != "fast"),
        "host1 still lists a VM whose QEMU is gone"
    );
    // `recover` names the loss instead of asking to retry.
    let (ok, v) = lab.ferry_json(&["migrations", "recover", &id, "--host", "host1"]);
    assert!(!ok && v["message"].as_str().unwrap_or("").contains("postcopy_lost"), "{v}");
    let lost = metric(
        &scrape(lab.host("host1").metrics),
        "ferry_migrations_total{role=\"source\",outcome=\"postcopy_lost\"}",
    );
    assert_eq!(lost, 1);

    proxy.heal();
    wait_until(Duration::from_secs(90), "host2 to learn the source half is lost", || {
        lab.only_migration_state("host2") == "postcopy_lost"
    });
    assert!(pid_alive(dst_pid), "the destination's half was stopped without the operator");
    let (_, shown) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert!(shown["error"].as_str().unwrap_or("").contains("released to the operator"), "{shown}");
    let (ok, v) = lab.ferry_json(&["vm", "stop", "fast", "--host", "host2"]);
    assert!(ok, "the operator cannot stop the frozen half: {v}");
    for (host, kinds) in [
        ("host1", ["postcopy_lost", "postcopy_lost_sent"]),
        ("host2", ["postcopy_lost", "postcopy_lost_received"]),
    ] {
        let log =
            std::fs::read_to_string(lab.host(host).state_dir.join("audit.log")).unwrap_or_default();
        for kind in kinds {
            assert!(log.contains(&format!("\"{kind}\"")), "no {kind} record in {host}'s audit log");
        }
    }
    verify_both_audit_logs(&lab);
}
