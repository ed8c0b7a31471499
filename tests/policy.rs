//! R3 and the control-plane threats C1–C7 of docs/architecture.md, run against real agents:
//! each is refused with the policy's (or admission control's) reason,
//! before any VM byte moves, and the VM stays where it was.

mod common;

use std::path::PathBuf;

use common::*;

fn refused(lab: &TestLab, vm: &str, from: &str, to: &str, causes: &[&str]) -> String {
    let o = lab.ferry(&["migrate", vm, "--to", to, "--host", from]);
    let out = text(&o);
    assert!(!o.status.success(), "migration of {vm} {from}->{to} succeeded: {out}");
    assert!(causes.iter().any(|c| out.contains(c)), "error does not name {causes:?}: {out}");
    assert_eq!(lab.vm_state(from, vm).as_deref(), Some("running"), "{vm} no longer runs on {from}");
    out
}

fn append(lab: &TestLab, host: &str, text: &str) {
    let cfg = &lab.host(host).config;
    let mut s = std::fs::read_to_string(cfg).expect("cfg");
    s.push_str(text);
    std::fs::write(cfg, s).expect("cfg");
}

fn start_vm(lab: &TestLab, host: &str, vm: &str, extra: &[&str]) {
    let mut args = vec![
        "vm",
        "start",
        "--host",
        host,
        "--name",
        vm,
        "--memory",
        "128",
        "--kernel",
        "ferry-guest.elf",
        "--cmdline",
        "fill_mib=8 dirty=0 hb_ms=50",
    ];
    args.extend_from_slice(extra);
    let o = lab.ferry(&args);
    assert!(o.status.success(), "vm start {vm}: {}", text(&o));
}

#[test]
fn placement_rules_are_enforced_on_both_sides() {
    let lab = TestLab::up(2, 0);
    // C3: a destination outside the VM's allowed zones (decided at the source).
    start_vm(&lab, "host1", "zoned", &["--zone", "zone-9"]);
    refused(&lab, "zoned", "host1", "host2", &["zone-allowed"]);
    // C6: anti-co-location, decided by the destination, which knows its residents.
    start_vm(&lab, "host2", "red-db", &["--tenant", "red"]);
    start_vm(&lab, "host1", "blue-web", &["--anti-affinity", "red"]);
    let out = refused(&lab, "blue-web", "host1", "host2", &["anti-co-location"]);
    assert!(out.contains("host2 refused"), "the destination should decide: {out}");
    assert_eq!(lab.vms("host2").len(), 1, "the destination launched something");
    // Security level above the hosts' trust (trust 3 in the lab): refused.
    start_vm(&lab, "host1", "secret", &["--security-level", "3"]);
    let (ok, _) = lab.ferry_json(&["migrate", "secret", "--to", "host2", "--host", "host1"]);
    assert!(ok, "level 3 on trust-3 hosts must be allowed");
    let m = scrape(lab.host("host2").metrics);
    assert!(metric(&m, "ferry_refusals_total{reason=\"policy\"}") >= 1, "{m}");
}

#[test]
fn operators_may_move_only_their_tenants_vms() {
    let lab = TestLab::up(2, 0);
    start_vm(&lab, "host1", "g", &[]);
    // eve: a valid operator certificate, role operator, tenant green.
    let ents = lab.dir.path().join("policy/entities.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&ents).expect("entities")).expect("json");
    v.as_array_mut().expect("array").push(serde_json::json!({
        "uid": {"type": "Operator", "id": "eve"}, "attrs": {"roles": ["operator"], "tenants": ["green"]}, "parents": []
    }));
    std::fs::write(&ents, v.to_string()).expect("write");
    let o = lab.ferry(&["policy", "reload", "--host", "host1"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = lab.dir.path().join("eve");
    let o = run(
        &[
            "ca",
            "issue",
            "operator",
            "eve",
            "--role",
            "operator",
            "--ca",
            lab.lab.ca_dir.to_str().expect("utf8"),
            "--out",
            out.to_str().expect("utf8"),
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    let cfg_text = std::fs::read_to_string(&lab.lab.client_config)
        .expect("cfg")
        .replace(
            &lab.lab.operator_cert.display().to_string(),
            &out.join("eve.pem").display().to_string(),
        )
        .replace(
            &lab.lab.operator_key.display().to_string(),
            &out.join("eve.key").display().to_string(),
        );
    let eve_cfg = lab.dir.path().join("eve.toml");
    std::fs::write(&eve_cfg, cfg_text).expect("write");
    let o = run(
        &[
            "migrate",
            "g",
            "--to",
            "host2",
            "--host",
            "host1",
            "--client-config",
            eve_cfg.to_str().expect("utf8"),
        ],
        None,
    );
    assert!(!o.status.success(), "eve moved another tenant's VM: {}", text(&o));
    assert!(text(&o).contains("operator-migrate-own-tenant"), "{}", text(&o));
    // The denial is in host1's signed audit log.
    let log =
        std::fs::read_to_string(lab.host("host1").state_dir.join("audit.log")).expect("audit");
    assert!(log.contains("\"denied\"") && log.contains("eve"), "denial not audited");
    assert_eq!(lab.running_on("g"), ["host1"]);
}

#[test]
fn cooldown_rate_limit_and_capacity_are_enforced() {
    let lab = TestLab::up(2, 0);
    for h in ["host1", "host2"] {
        let cfg = &lab.host(h).config;
        let s = std::fs::read_to_string(cfg)
            .expect("cfg")
            .replace("vm_cooldown = \"0s\"", "vm_cooldown = \"60s\"");
        std::fs::write(cfg, s).expect("cfg");
    }
    append(&lab, "host1", "\n[migration]\noutgoing_max = 2\noutgoing_window_ms = 60000\n");
    lab.restart_agent("host1");
    lab.restart_agent("host2");
    for vm in ["a", "b", "c"] {
        start_vm(&lab, "host1", vm, &[]);
    }
    // C2/C5: moved once, then straight back: refused inside the cooldown.
    let (ok, rec) = lab.ferry_json(&["migrate", "a", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    refused(&lab, "a", "host2", "host1", &["cooldown"]);
    // C4: host1 may send 2 migrations per minute to host2; the third is refused.
    let (ok, rec) = lab.ferry_json(&["migrate", "b", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    refused(&lab, "c", "host1", "host2", &["rate limit"]);
}

#[test]
fn a_destination_without_the_capacity_refuses_at_the_offer() {
    let lab = TestLab::up(2, 0);
    let vm = lab.start_guest("host1", "big", 256, "fill_mib=64 dirty=16 hb_ms=10");
    let log = PathBuf::from(vm["console_log"].as_str().expect("log"));
    // C7: host2 has room for 128 MiB only, whatever the source believed.
    append(&lab, "host2", "capacity_memory_mib = 128\n");
    let cfg = &lab.host("host2").config;
    let s = std::fs::read_to_string(cfg).expect("cfg");
    // Move the appended key into [admission] (it was appended to the last table).
    let s = s
        .replace("capacity_memory_mib = 128\n", "")
        .replace("[admission]\n", "[admission]\ncapacity_memory_mib = 128\n");
    std::fs::write(cfg, s).expect("cfg");
    lab.restart_agent("host2");
    let out = refused(&lab, "big", "host1", "host2", &["needs 256 MiB"]);
    assert!(out.contains("admission"), "{out}");
    assert!(
        live_qemus_under(&lab.host("host2").state_dir).is_empty(),
        "refused after launching QEMU"
    );
    assert_guest_runs(&log);
}

#[test]
fn a_broken_policy_reload_keeps_the_old_policy() {
    let lab = TestLab::up(2, 0);
    start_vm(&lab, "host1", "g", &[]);
    let pol = lab.dir.path().join("policy/ferry.cedar");
    let good = std::fs::read_to_string(&pol).expect("policy");
    std::fs::write(
        &pol,
        format!(
            "{good}\npermit (principal, action, resource) when {{ resource.tenantz == \"x\" }};\n"
        ),
    )
    .expect("write");
    let o = lab.ferry(&["policy", "reload", "--host", "host1"]);
    assert!(!o.status.success(), "a schema violation was accepted: {}", text(&o));
    assert!(
        text(&o).contains("tenantz") && text(&o).contains("ferry.cedar:"),
        "no file:line:col: {}",
        text(&o)
    );
    std::fs::write(&pol, format!("{good}\npermit (principal action resource);\n")).expect("write");
    let pid = lab.agent_pid("host1");
    let _ = std::process::Command::new("kill").args(["-HUP", &pid.to_string()]).status();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(std::fs::read_to_string(&lab.host("host1").log)
        .expect("log")
        .contains("policy reload refused"));
    // The old policy still decides: the admin may migrate.
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "the old policy should still allow this: {rec}");
}

/// C1: a flood of 50 concurrent, attested, correctly signed offers to one
/// destination. Only `max_concurrent_incoming` (4) are admitted; the rest
/// are refused quickly with admission control's reason; the agent keeps
/// answering, and the VM it already runs is unaffected.
#[test]
fn a_flood_of_offers_is_admitted_only_up_to_the_limit() {
    let lab = TestLab::up(2, 0);
    start_vm(&lab, "host2", "resident", &[]);
    let resident_log = std::path::PathBuf::from(
        lab.vms("host2").iter().find(|v| v["name"] == "resident").expect("resident")["console_log"]
            .as_str()
            .expect("log")
            .to_owned(),
    );
    // Attest 50 connections first (one swtpm serves them in turn), then offer at once.
    let mut rogues: Vec<RogueSource> = (0..50)
        .map(|i| {
            let mut r = RogueSource::connect(&lab, "host1", "host2")
                .unwrap_or_else(|e| panic!("connect {i}: {e}"));
            r.attest().unwrap_or_else(|e| panic!("attest {i}: {e}"));
            r
        })
        .collect();
    let results: Vec<(String, String, std::time::Duration, RogueSource)> =
        std::thread::scope(|s| {
            let handles: Vec<_> = rogues
                .drain(..)
                .enumerate()
                .map(|(i, mut r)| {
                    s.spawn(move || {
                        let body = r.offer_body(&format!("flood{i}"));
                        let t = std::time::Instant::now();
                        r.send_offer(body).expect("offer");
                        let answer = r.read().unwrap_or_else(
                            |e| serde_json::json!({ "type": "error", "reason": e }),
                        );
                        let kind = answer["type"].as_str().unwrap_or("").to_owned();
                        let reason = answer["reason"].as_str().unwrap_or("").to_owned();
                        (kind, reason, t.elapsed(), r)
                    })
                })
                .collect();
            // The agent keeps answering while the flood is on.
            let (ok, st) = lab.ferry_json(&["status", "--host", "host2"]);
            assert!(ok, "host2 stopped answering during the flood: {st}");
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        });
    let accepted = results.iter().filter(|r| r.0 == "accept").count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == "refuse").collect();
    assert_eq!(
        accepted,
        4,
        "admitted {accepted} of 50: {:?}",
        results.iter().map(|r| (&r.0, &r.1)).collect::<Vec<_>>()
    );
    assert_eq!(refused.len(), 46);
    for r in &refused {
        assert!(
            r.1.contains("admission control"),
            "refusal without admission control's reason: {}",
            r.1
        );
    }
    let mut lat: Vec<u128> = refused.iter().map(|r| r.2.as_millis()).collect();
    lat.sort_unstable();
    eprintln!(
        "refusal latency under a 50-offer flood: p50 {} ms, max {} ms",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
    assert!(lat[lat.len() - 1] < 15_000, "refusals were not quick: {lat:?}");
    // The admitted ones are abandoned by their rogue sources: host2 discards them.
    drop(results);
    wait_until(
        std::time::Duration::from_secs(30),
        "host2 to discard the abandoned migrations",
        || live_qemus_under(&lab.host("host2").state_dir).len() == 1,
    );
    assert_eq!(lab.vm_state("host2", "resident").as_deref(), Some("running"));
    assert_guest_runs(&resident_log);
    let m = scrape(lab.host("host2").metrics);
    assert_eq!(metric(&m, "ferry_refusals_total{reason=\"admission\"}"), 46, "{m}");
}
