//! Lab hosts that run libvirt (`ferry lab up --backend libvirt`): virsh
//! against a host's own libvirtd, and the test guest as a libvirt domain.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_cli::console;
use ferry_cli::lab_libvirt::{self, LabLibvirt};

use super::{text, wait_console, wait_until, TestLab};

pub fn libvirt<'a>(lab: &'a TestLab, host: &str) -> &'a LabLibvirt {
    lab.host(host).libvirt.as_ref().expect("the host runs libvirt")
}

pub fn virsh(lab: &TestLab, host: &str, args: &[&str]) -> String {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(libvirt(lab, host).uri())
        .args(args)
        .output()
        .expect("run virsh");
    assert!(o.status.success(), "virsh {args:?} on {host}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// `virsh domstate`, or None when the host has no such domain.
pub fn domstate(lab: &TestLab, host: &str, vm: &str) -> Option<String> {
    let o = Command::new("virsh")
        .arg("-c")
        .arg(libvirt(lab, host).uri())
        .args(["domstate", vm])
        .output()
        .expect("run virsh");
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Define and start the test guest as a persistent libvirt domain on
/// `host`; its console appends to a file in the lab directory.
pub fn start_domain(lab: &TestLab, host: &str, vm: &str, cmdline: &str) -> PathBuf {
    start_domain_with(lab, host, vm, 128, LAB_LABELS, cmdline)
}

/// The labels `lab_libvirt::domain_xml` gives a domain.
pub const LAB_LABELS: &str = "tenant='lab' security-level='1'";

/// [`start_domain`] with its memory and its Ferry labels (the attributes of
/// `<ferry:labels>`, e.g. `tenant='red' security-level='1'`).
pub fn start_domain_with(
    lab: &TestLab,
    host: &str,
    vm: &str,
    memory_mib: u32,
    labels: &str,
    cmdline: &str,
) -> PathBuf {
    let console = lab.dir.path().join(format!("{vm}.console"));
    let kernel = lab.lab.images_dir.join(&lab.lab.guest_image);
    let xml = lab_libvirt::domain_xml(vm, &kernel, &console, memory_mib, cmdline);
    assert!(xml.contains(LAB_LABELS), "the lab's domain XML changed: {xml}");
    let xml = xml.replace(LAB_LABELS, labels);
    let path = lab.dir.path().join(format!("{vm}.xml"));
    std::fs::write(&path, xml).expect("write domain xml");
    virsh(lab, host, &["define", path.to_str().expect("utf8")]);
    virsh(lab, host, &["start", vm]);
    wait_console(&console, Duration::from_secs(120), "READY and a clean sweep", |l| {
        console::is_ready(l) && console::clean_sweeps(l) >= 1
    });
    console
}

pub fn sweeps_after(log: &Path, skip: usize, n: usize) -> Vec<console::ConsoleLine> {
    wait_console(log, Duration::from_secs(90), "sweeps on the destination", |l| {
        l.iter()
            .skip(skip)
            .filter(|x| matches!(x.line, ferry_guest::GuestLine::Sweep { .. }))
            .count()
            >= n
    })
}

/// `ferry migrate VM --to TO --host FROM --json`: (success, output).
pub fn migrate_domain(lab: &TestLab, vm: &str, from: &str, to: &str) -> (bool, String) {
    let o = lab.ferry(&["migrate", vm, "--to", to, "--host", from, "--json"]);
    (o.status.success(), text(&o))
}

/// After a failed migration of `vm` from `from` to `to`: libvirt runs the
/// domain on `from` again (and the guest with it, memory intact), and `to`
/// has no domain of that name, running or not.
pub fn assert_domain_stayed(lab: &TestLab, vm: &str, from: &str, to: &str, log: &Path) {
    wait_until(Duration::from_secs(30), "the source domain to run again", || {
        domstate(lab, from, vm).as_deref() == Some("running")
    });
    wait_until(Duration::from_secs(30), "no domain left on the destination", || {
        domstate(lab, to, vm).is_none()
    });
    super::assert_guest_runs(log);
    super::assert_memory_consistent(log);
}

/// After a migration from `from` to `to` that the destination's gate
/// refused: both agents' records of it end aborted, and `to` never opened
/// its gate (no `resuming` in its audit log, so no Receipt either).
pub fn assert_refused_at_the_gate(lab: &TestLab, from: &str, to: &str) {
    for host in [from, to] {
        let recs = super::records(lab, host);
        assert_eq!(recs.last().map(|r| r.0.as_str()), Some("aborted"), "{host} records: {recs:?}");
    }
    let audit = std::fs::read_to_string(lab.host(to).state_dir.join("audit.log"))
        .expect("destination audit log");
    assert!(!audit.contains("\"resuming\""), "{to} opened its gate: {audit}");
}

/// Wait (polling closely) until `host` audits that its gate opened for a
/// migration: the digests matched and SHUT is about to go; the Receipt
/// comes only once libvirt runs the domain there.
pub fn wait_gate_opened(lab: &TestLab, host: &str) {
    wait_audited(lab, host, "resuming");
}

/// Wait (polling closely) until `host`'s audit log has a `kind` record.
pub fn wait_audited(lab: &TestLab, host: &str, kind: &str) {
    let audit = lab.host(host).state_dir.join("audit.log");
    let quoted = format!("\"{kind}\"");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !std::fs::read_to_string(&audit).unwrap_or_default().contains(&quoted) {
        assert!(std::time::Instant::now() < deadline, "{host} never audited {kind}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A FUSE filesystem (bindfs, passing through to a directory beside it)
/// mounted over `path` inside a lab host's mount namespace, for as long as
/// it lives: a real FUSE mount, as GlusterFS or cephfs-fuse would be.
pub struct FuseMount {
    daemon: std::process::Child,
}

impl FuseMount {
    pub fn over(lab: &TestLab, host: &str, path: &str) -> FuseMount {
        let lv = libvirt(lab, host);
        let backing = format!("{path}.backing");
        let enter = lv.enter();
        let inside = |args: &[&str]| {
            let o = Command::new(&enter[0]).args(&enter[1..]).args(args).output().expect("nsenter");
            assert!(o.status.success(), "{args:?} inside {host}: {}", text(&o));
            String::from_utf8_lossy(&o.stdout).trim().to_owned()
        };
        inside(&["mkdir", "-p", path, &backing]);
        let daemon = Command::new(&enter[0])
            .args(&enter[1..])
            .args(["bindfs", "-f", "-o", "allow_other", &backing, path])
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("start bindfs (apt-get install bindfs)");
        let fuse = FuseMount { daemon };
        // FUSE_SUPER_MAGIC, as statfs reports it inside the host.
        wait_until(Duration::from_secs(10), "the FUSE mount", || {
            inside(&["stat", "-f", "-c", "%t", path]) == "65735546"
        });
        fuse
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        // The mount dies with its daemon (and the namespace with the lab).
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// Where `host`'s agent keeps its per-migration socket directories, as seen
/// from outside the host's namespace.
pub fn migration_socket_dir(lab: &TestLab, host: &str) -> PathBuf {
    libvirt(lab, host).dir.join("ferry-run")
}

/// `ferry migrate VM --to TO --host FROM --json`, running in the background.
pub fn spawn_migrate_domain(lab: &TestLab, vm: &str, from: &str, to: &str) -> std::process::Child {
    Command::new(super::FERRY)
        .args(["migrate", vm, "--to", to, "--host", from, "--json"])
        .env("FERRY_CLIENT_CONFIG", &lab.lab.client_config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn migrate")
}

/// A local process (python3, so neither libvirtd nor QEMU) that connects to
/// `sock`, writes a little and stays connected for a while. With `uid`, it
/// runs as that user, keeping only the right to pass the socket directory's
/// permissions, so that the agent's own check (not the directory) is tested.
pub fn local_intruder(sock: &Path, uid: Option<u32>) -> std::process::Child {
    const CLIENT: &str = "import socket,sys,time\n\
        s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
        s.sendall(b'not libvirt' * 400); time.sleep(20)\n";
    let mut c = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()])
                .args(["--inh-caps=+dac_override", "--ambient-caps=+dac_override", "python3"]);
            c
        }
        None => Command::new("python3"),
    };
    c.args(["-c", CLIENT])
        .arg(sock)
        .stdin(std::process::Stdio::null())
        // Refused, it sees its connection closed: that is the point.
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the local intruder")
}

/// The first migration directory with a stream socket that appears under
/// `dir` (polled closely: the test races libvirt for the socket).
pub fn wait_migration_sockets(dir: &Path) -> PathBuf {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let found = std::fs::read_dir(dir).into_iter().flatten().flatten().find_map(|e| {
            let p = e.path();
            p.join("mig.sock").exists().then_some(p)
        });
        if let Some(p) = found {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "no migration sockets in {}", dir.display());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Cap libvirt's migration bandwidth for `vm` (MiB/s), so that a fault can
/// land mid-transfer.
pub fn slow_migration(lab: &TestLab, host: &str, vm: &str, mib_s: u32) {
    virsh(lab, host, &["migrate-setspeed", vm, "--bandwidth", &mib_s.to_string()]);
}

/// Wait until libvirt's Prepare created the incoming domain on `to` (paused)
/// and state has been flowing into it for a moment.
pub fn wait_domain_arriving(lab: &TestLab, to: &str, vm: &str) {
    wait_until(Duration::from_secs(60), "the incoming domain", || {
        domstate(lab, to, vm).as_deref() == Some("paused")
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(domstate(lab, to, vm).as_deref(), Some("paused"), "the transfer ended already");
}

/// Hosts on which libvirt runs `vm` (by `virsh domstate`).
pub fn domain_running_on(lab: &TestLab, vm: &str) -> Vec<String> {
    lab.lab
        .hosts
        .iter()
        .map(|h| h.name.to_string())
        .filter(|h| domstate(lab, h, vm).as_deref() == Some("running"))
        .collect()
}

/// A rogue source with host1's identity and a real quote whose signed Offer
/// for `vm` host2 accepted, and the control connection of that migration,
/// joined: what it writes there goes to host2's allowlist.
pub fn rogue_control(lab: &TestLab, vm: &str) -> (super::RogueSource, super::RogueSource) {
    let mut rogue = super::RogueSource::connect(lab, "host1", "host2").expect("connect");
    rogue.attest().expect("attest");
    let offer = rogue.offer_body(vm);
    rogue.send_offer(offer).expect("offer");
    let accept = rogue.read().expect("answer");
    assert_eq!(accept["type"], "accept", "{accept}");
    let mut control = super::RogueSource::connect(lab, "host1", "host2").expect("connect");
    let join = serde_json::json!({"type": "control_join", "migration_id": rogue.id});
    control.send(&join).expect("join");
    (rogue, control)
}

/// A libvirt remote-protocol call, as a data frame of the control connection.
pub fn libvirt_call(procedure: i32, serial: u32, body: &[u8]) -> Vec<u8> {
    use ferry_libvirt::rpc::{message, MessageType, REMOTE_PROGRAM};
    super::frame(2, &message(REMOTE_PROGRAM, procedure, MessageType::Call, serial, body))
}

/// Wait for host2's record of migration `id` to be aborted; returns it.
pub fn aborted_on_host2(lab: &TestLab, id: &str) -> serde_json::Value {
    wait_until(Duration::from_secs(30), "the migration to fail", || {
        lab.ferry_json(&["migrations", "show", id, "--host", "host2"]).1["state"] == "aborted"
    });
    lab.ferry_json(&["migrations", "show", id, "--host", "host2"]).1
}

/// host2's audit records of the refused control-connection calls.
pub fn control_calls_refused(lab: &TestLab) -> Vec<String> {
    let audit = std::fs::read_to_string(lab.host("host2").state_dir.join("audit.log"))
        .expect("host2 audit log");
    audit.lines().filter(|l| l.contains("\"control_call_refused\"")).map(str::to_owned).collect()
}

/// After `ferry migrate` of domain `vm` (its record `rec`) from `from` to
/// `to`: one copy, on `to`; both agents' records agree on the bytes and
/// digest they signed for; the guest's heartbeat went on and its memory
/// checks clean after the move (`before`: the console before migrating).
pub fn assert_domain_moved(
    lab: &TestLab,
    vm: &str,
    (from, to): (&str, &str),
    rec: &serde_json::Value,
    (log, before): (&Path, &[console::ConsoleLine]),
) {
    assert_eq!(rec["state"], "completed", "{rec}");
    assert_eq!(domstate(lab, to, vm).as_deref(), Some("running"));
    assert_eq!(domstate(lab, from, vm), None, "{from} still has the domain");
    let id = rec["id"].as_str().expect("id");
    let (ok, dst) = lab.ferry_json(&["migrations", "show", id, "--host", to]);
    assert!(ok, "{dst}");
    assert_eq!(dst["state"], "completed", "{dst}");
    assert_eq!((&dst["digest"], &dst["bytes"]), (&rec["digest"], &rec["bytes"]));
    // The guest's downtime, as the destination's libvirt reports it (the
    // source's is gone with its copy) and signed into the Receipt, is in
    // both records.
    let downtime = dst["qemu_downtime_ms"].as_u64();
    assert!(downtime.is_some(), "no downtime in {to}'s record: {dst}");
    let (ok, src) = lab.ferry_json(&["migrations", "show", id, "--host", from]);
    assert!(ok, "{src}");
    assert_eq!(src["qemu_downtime_ms"].as_u64(), downtime, "{from}'s record: {src}");
    let after = sweeps_after(log, before.len(), 2);
    let c = console::analyze(before, &after[before.len()..]);
    assert!(c.heartbeat_continued, "heartbeat did not continue: {c:?}");
    assert!(c.memory_consistent(), "guest memory check failed: {c:?}");
}
