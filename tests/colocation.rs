//! The survey's C6 (malicious co-location) and admission limits across
//! restarts, against real agents, QEMU and swtpm: a resident VM's
//! anti-affinity keeps other tenants off its host whichever side moves or
//! starts, and cooldowns and rate windows survive an agent restart.

mod common;

use common::*;

/// The guest: small, dirtying, TLB-flushing under TCG.
const GUEST: &str = "fill_mib=16 dirty=2 hb_ms=10 tlbflush=1";

fn start_vm(lab: &TestLab, host: &str, vm: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["vm", "start", "--host", host, "--name", vm, "--memory", "128"];
    args.extend_from_slice(&["--kernel", "ferry-guest.elf", "--cmdline", GUEST]);
    args.extend_from_slice(extra);
    lab.ferry(&args)
}

fn started(lab: &TestLab, host: &str, vm: &str, extra: &[&str]) {
    let o = start_vm(lab, host, vm, extra);
    assert!(o.status.success(), "vm start {vm} on {host}: {}", text(&o));
}

/// `vm` cannot move `from` -> `to`; the error names every one of `names`,
/// and the VM still runs where it was.
fn refused(lab: &TestLab, vm: &str, from: &str, to: &str, names: &[&str]) -> String {
    let o = lab.ferry(&["migrate", vm, "--to", to, "--host", from]);
    let out = text(&o);
    assert!(!o.status.success(), "migration of {vm} {from}->{to} succeeded: {out}");
    for n in names {
        assert!(out.contains(n), "error does not name {n}: {out}");
    }
    assert_eq!(lab.vm_state(from, vm).as_deref(), Some("running"), "{vm} no longer runs on {from}");
    out
}

fn vm_names(lab: &TestLab, host: &str) -> Vec<String> {
    lab.vms(host).iter().map(|v| v["name"].as_str().unwrap_or("").to_owned()).collect()
}

#[test]
fn a_residents_anti_affinity_keeps_other_tenants_off_its_host() {
    let lab = TestLab::up(2, 0);
    let host2_dir = lab.host("host2").state_dir.clone();
    // The reproduction: red's victim excludes blue; blue's attacker moves in.
    started(&lab, "host2", "victim", &["--tenant", "red", "--anti-affinity", "blue"]);
    started(&lab, "host1", "attacker", &["--tenant", "blue"]);
    let out = refused(
        &lab,
        "attacker",
        "host1",
        "host2",
        &["host2 refused", "resident-anti-co-location", "`victim`", "tenant `red`"],
    );
    assert_eq!(lab.running_on("attacker"), ["host1"], "{out}");
    assert_eq!(vm_names(&lab, "host2"), ["victim"], "host2 took in something");
    assert_eq!(live_qemus_under(&host2_dir).len(), 1, "host2 launched a QEMU for the attacker");
    let audit = std::fs::read_to_string(host2_dir.join("audit.log")).expect("audit");
    assert!(
        audit.lines().any(|l| l.contains("\"refused\"") && l.contains("resident-anti-co-location")),
        "the refusal is not in host2's audit log"
    );

    // The other direction: a mover that excludes red, next to red's victim.
    started(&lab, "host1", "picky", &["--tenant", "green", "--anti-affinity", "red"]);
    refused(&lab, "picky", "host1", "host2", &["host2 refused", "`anti-co-location`", "`victim`"]);
    assert_eq!(vm_names(&lab, "host2"), ["victim"]);

    // `ferry policy explain` with host2's view names the resident that blocked it.
    let policy = lab.dir.path().join("policy");
    let (p, e) = (policy.join("ferry.cedar"), policy.join("entities.json"));
    let o = lab.ferry(&[
        "policy",
        "explain",
        "--policy",
        p.to_str().expect("utf8"),
        "--entities",
        e.to_str().expect("utf8"),
        "--action",
        "receive-vm",
        "--vm",
        "attacker",
        "--tenant",
        "blue",
        "--from",
        "host1",
        "--to",
        "host2",
        "--resident",
        "name=victim,tenant=red,anti-affinity=blue",
        "--resident",
        "name=bystander,tenant=green",
    ]);
    let explained = text(&o);
    assert_eq!(o.status.code(), Some(3), "a deny exits 3: {explained}");
    let blocked = explained.split("blocked by resident(s):").nth(1).expect("{explained}");
    assert!(blocked.contains("`victim`") && !blocked.contains("bystander"), "{explained}");

    // A tenant nobody excludes still moves in: the rule is not a blanket refusal.
    started(&lab, "host1", "neighbour", &["--tenant", "green"]);
    let (ok, rec) = lab.ferry_json(&["migrate", "neighbour", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    assert_eq!(lab.running_on("neighbour"), ["host2"]);
    assert_eq!(lab.vm_state("host2", "victim").as_deref(), Some("running"));
}

#[test]
fn vm_start_respects_residents_in_both_directions() {
    let lab = TestLab::up(1, 0);
    let dir = lab.host("host1").state_dir.clone();
    started(&lab, "host1", "victim", &["--tenant", "red", "--anti-affinity", "blue"]);
    for (vm, extra, rule) in [
        ("attacker", &["--tenant", "blue"][..], "resident-anti-co-location"),
        ("picky", &["--tenant", "green", "--anti-affinity", "red"][..], "`anti-co-location`"),
    ] {
        let o = start_vm(&lab, "host1", vm, extra);
        let out = text(&o);
        assert!(!o.status.success(), "{vm} started next to the victim: {out}");
        assert!(out.contains(rule) && out.contains("`victim`"), "{out}");
        assert_eq!(vm_names(&lab, "host1"), ["victim"], "{vm} was started");
        assert_eq!(live_qemus_under(&dir).len(), 1, "a QEMU was launched for {vm}");
    }
    let audit = std::fs::read_to_string(dir.join("audit.log")).expect("audit");
    assert!(audit.contains("\"start_denied\""), "start refusals are not audited");
    started(&lab, "host1", "neighbour", &["--tenant", "green"]);
}

#[test]
fn cooldown_and_rate_limit_survive_an_agent_restart() {
    let lab = TestLab::up(2, 0);
    for h in ["host1", "host2"] {
        lab.edit_config(h, "vm_cooldown = \"0s\"", "vm_cooldown = \"60s\"");
    }
    let cfg = lab.host("host1").config.clone();
    let mut s = std::fs::read_to_string(&cfg).expect("cfg");
    s.push_str("\n[migration]\noutgoing_max = 2\noutgoing_window_ms = 60000\n");
    std::fs::write(&cfg, s).expect("cfg");
    lab.restart_agent("host1");
    lab.restart_agent("host2");
    for vm in ["a", "b", "c"] {
        started(&lab, "host1", vm, &[]);
    }
    // C2/C5: a moves to host2; host2's agent crashes and comes back; moving a
    // straight back is still inside its cooldown.
    let (ok, rec) = lab.ferry_json(&["migrate", "a", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    lab.restart_agent("host2");
    assert_eq!(lab.vm_state("host2", "a").as_deref(), Some("running"), "a not adopted");
    let out = refused(&lab, "a", "host2", "host1", &["cooldown"]);
    // host2 itself refuses (host1 also remembers the move, but is never asked).
    assert!(!out.contains("host1 refused"), "{out}");

    // C4: host1 may send 2 per minute; the second goes, host1 restarts, the
    // third is refused all the same.
    let (ok, rec) = lab.ferry_json(&["migrate", "b", "--to", "host2", "--host", "host1"]);
    assert!(ok, "{rec}");
    lab.restart_agent("host1");
    refused(&lab, "c", "host1", "host2", &["rate limit"]);
    let log = std::fs::read_to_string(&lab.host("host1").log).expect("log");
    assert!(log.contains("admission limits rebuilt"), "no start-up note");
}
