//! libvirt domains with a vTPM under Ferry, for real: each lab host's
//! libvirtd runs the domain's swtpm, QEMU carries the TPM's state inside
//! the migration stream (under Ferry's TLS and digest), the destination's
//! TPM is the source's, and the source keeps no copy of it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use ferry_cli::{console, lab_libvirt};

const EMULATED: &str = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
const KEPT: &str = "<tpm model='tpm-crb'>\
    <backend type='emulator' version='2.0' persistent_state='yes'/></tpm>";

/// Define and start the test guest with the vTPM `tpm` as a persistent
/// domain on `host`; the guest extends PCR 16 with MARKER and bumps its NV
/// counter at boot, then re-reads both every 300 ms.
fn start_tpm_domain(lab: &TestLab, host: &str, vm: &str, tpm: &str) -> PathBuf {
    start_tpm_domain_as(lab, host, vm, tpm, true)
}

/// The same; a transient domain (`virsh create`) unless `persistent`.
fn start_tpm_domain_as(
    lab: &TestLab,
    host: &str,
    vm: &str,
    tpm: &str,
    persistent: bool,
) -> PathBuf {
    let console = lab.dir.path().join(format!("{vm}.console"));
    let kernel = lab.lab.images_dir.join(&lab.lab.guest_image);
    let cmdline = format!("fill_mib=32 dirty=16 hb_ms=20 tlbflush=1 tpm={MARKER} tpm_ms=300");
    let xml = lab_libvirt::domain_xml(vm, &kernel, &console, 128, &cmdline)
        .replace("</devices>", &format!("  {tpm}\n  </devices>"));
    let path = lab.dir.path().join(format!("{vm}.xml"));
    std::fs::write(&path, xml).expect("write domain xml");
    let path = path.to_str().expect("utf8");
    if persistent {
        virsh(lab, host, &["define", path]);
        virsh(lab, host, &["start", vm]);
    } else {
        virsh(lab, host, &["create", path]);
    }
    wait_console(&console, Duration::from_secs(120), "READY, a TPM line, a clean sweep", |l| {
        console::is_ready(l) && !tpm_reads(l).is_empty() && console::clean_sweeps(l) >= 1
    });
    console
}

/// libvirt's swtpm state directory of domain `uuid` on `host`, as seen from
/// outside the host's mount namespace (its `/var/lib/libvirt/swtpm/UUID`).
fn swtpm_dir(lab: &TestLab, host: &str, uuid: &str) -> PathBuf {
    libvirt(lab, host).dir.join("lib").join("swtpm").join(uuid)
}

/// Every file under `dir` with its contents, by path relative to `dir`.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut found: Vec<_> = entries_below(dir)
        .into_iter()
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).expect("read state file");
            (p.strip_prefix(dir).expect("under dir").to_owned(), bytes)
        })
        .collect();
    found.sort();
    found
}

fn permanent_state(lab: &TestLab, host: &str, uuid: &str) -> Option<Vec<u8>> {
    std::fs::read(swtpm_dir(lab, host, uuid).join("tpm2").join("tpm2-00.permall")).ok()
}

#[test]
fn a_libvirt_domains_vtpm_moves_in_the_stream_and_leaves_no_copy_behind() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_tpm_domain(&lab, "host1", "lvt", EMULATED);
    let uuid = virsh(&lab, "host1", &["domuuid", "lvt"]);
    let listed = lab.vms("host1").into_iter().find(|v| v["name"] == "lvt").expect("listed");
    assert_eq!(listed["tpm"], "crb", "vm list says the domain has a vTPM: {listed}");
    let before = permanent_state(&lab, "host1", &uuid).expect("libvirt's swtpm keeps its state");
    assert!(permanent_state(&lab, "host2", &uuid).is_none(), "host2 has the TPM already");

    let (ok, rec) = lab.ferry_json(&["migrate", "lvt", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    assert_eq!(rec["tpm"], "crb", "the record says the VM has a vTPM: {rec}");
    let id = rec["id"].as_str().expect("id").to_owned();
    assert_eq!(domstate(&lab, "host2", "lvt").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host1", "lvt"), None, "host1 still has the domain");

    // The TPM on host2 is host1's: its permanent state arrived byte for
    // byte, and the guest reads the PCR and counter it wrote at boot.
    let arrived = permanent_state(&lab, "host2", &uuid).expect("host2's swtpm state");
    assert!(arrived == before, "the vTPM's permanent state differs after the move");
    assert_vtpm_kept(&log);

    // No clone left behind on host1, not even an empty directory.
    let left = swtpm_dir(&lab, "host1", &uuid);
    assert!(!left.exists(), "host1 kept vTPM state: {:?}", files_under(&left));

    // Both agents signed for the same bytes (the TPM's state among them).
    let (ok, dst) = lab.ferry_json(&["migrations", "show", &id, "--host", "host2"]);
    assert!(ok, "{dst}");
    assert_eq!((&dst["digest"], &dst["bytes"]), (&rec["digest"], &rec["bytes"]));

    // And back: the same TPM again, nothing left on host2.
    let on_host2 = files_under(&swtpm_dir(&lab, "host2", &uuid));
    let (ok, back) = lab.ferry_json(&["migrate", "lvt", "--to", "host1", "--host", "host2"]);
    assert!(ok, "migration back failed: {back}");
    assert_eq!(domstate(&lab, "host1", "lvt").as_deref(), Some("running"));
    assert_eq!(files_under(&swtpm_dir(&lab, "host1", &uuid)), on_host2);
    assert!(!swtpm_dir(&lab, "host2", &uuid).exists(), "host2 kept vTPM state");
    assert_vtpm_kept(&log);
}

#[test]
fn an_operator_who_keeps_the_vtpm_state_finds_it_on_the_source() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_tpm_domain(&lab, "host1", "keep", KEPT);
    let uuid = virsh(&lab, "host1", &["domuuid", "keep"]);
    let before = permanent_state(&lab, "host1", &uuid).expect("libvirt's swtpm keeps its state");

    let (ok, rec) = lab.ferry_json(&["migrate", "keep", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    assert_eq!(domstate(&lab, "host2", "keep").as_deref(), Some("running"));
    assert_eq!(permanent_state(&lab, "host2", &uuid).as_ref(), Some(&before));
    assert_vtpm_kept(&log);
    // persistent_state='yes' is the operator's word: the state stays.
    assert_eq!(permanent_state(&lab, "host1", &uuid).as_ref(), Some(&before));
    let erased: Vec<_> =
        audit_kinds(&lab, "host1").into_iter().filter(|e| e["kind"] == "vtpm_erased").collect();
    assert!(erased.is_empty(), "{erased:?}");
}

#[test]
fn a_transient_domains_vtpm_state_is_gone_from_the_source() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_tpm_domain_as(&lab, "host1", "tr", EMULATED, false);
    let uuid = virsh(&lab, "host1", &["domuuid", "tr"]);
    let before = permanent_state(&lab, "host1", &uuid).expect("libvirt's swtpm keeps its state");
    let (ok, rec) = lab.ferry_json(&["migrate", "tr", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    assert_eq!(permanent_state(&lab, "host2", &uuid).as_ref(), Some(&before));
    assert_vtpm_kept(&log);
    let left = swtpm_dir(&lab, "host1", &uuid);
    assert!(!left.exists(), "host1 kept vTPM state: {:?}", files_under(&left));
}

/// A vTPM whose swtpm the operator runs outside libvirt (`backend
/// type='external'`): its state never travels in the stream, so the move is
/// refused before any Offer, with the reason, and the domain runs on.
#[test]
fn an_external_vtpm_is_refused_up_front_with_the_reason() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let state = lab.dir.path().join("external-tpm");
    std::fs::create_dir_all(&state).expect("mkdir");
    let ctrl = state.join("ctrl.sock");
    let mut swtpm = std::process::Command::new("swtpm")
        .arg("socket")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", ctrl.display()))
        .spawn()
        .expect("start swtpm");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ctrl.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let external = format!(
        "<tpm model='tpm-crb'><backend type='external'>\
         <source type='unix' mode='connect' path='{}'/></backend></tpm>",
        ctrl.display()
    );
    // The guest leaves the TPM alone; only the definition matters here.
    let console = lab.dir.path().join("ext.console");
    let kernel = lab.lab.images_dir.join(&lab.lab.guest_image);
    let xml = lab_libvirt::domain_xml("ext", &kernel, &console, 128, "fill_mib=8 hb_ms=20")
        .replace("</devices>", &format!("  {external}\n  </devices>"));
    let path = lab.dir.path().join("ext.xml");
    std::fs::write(&path, xml).expect("write domain xml");
    virsh(&lab, "host1", &["create", path.to_str().expect("utf8")]);
    wait_console(&console, Duration::from_secs(120), "READY", console::is_ready);

    let (ok, rec) = lab.ferry_json(&["migrate", "ext", "--to", "host2", "--host", "host1"]);
    let _ = swtpm.kill();
    let _ = swtpm.wait();
    assert!(!ok, "an external vTPM moved: {rec}");
    let why = rec.to_string();
    assert!(why.contains("external") && why.contains("emulator"), "no clear reason: {rec}");
    assert_eq!(domstate(&lab, "host1", "ext").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host2", "ext"), None);
}

/// libvirt removes the source's vTPM state itself when the domain leaves;
/// it keeps it when its Finish reply is lost (libvirt's Confirm is then
/// cancelled: the domain stays defined here, and libvirt resumes it). The
/// reply is lost for real here: once host2's gate opened, the man in the
/// middle swallows everything host2 sends on libvirt's control connection.
/// host2 runs the domain and signs its Receipt; host1's agent stops the
/// copy libvirt kept and erases the clone of the TPM: a stale file planted
/// in the state directory (linked from outside it) reads back as zeros, the
/// directory is gone, and the erase is audited.
#[test]
fn a_vtpm_clone_libvirt_keeps_after_a_lost_finish_reply_is_erased_by_ferry() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let log = start_tpm_domain(&lab, "host1", "lost", EMULATED);
    let uuid = virsh(&lab, "host1", &["domuuid", "lost"]);
    let mitm = Mitm::start(lab.host("host2").addr, Tamper::None, None);
    lab.route_peer("host1", "host2", mitm.addr);
    lab.restart_agent("host1");
    let state = swtpm_dir(&lab, "host1", &uuid);
    let planted = permanent_state(&lab, "host1", &uuid).expect("libvirt's swtpm keeps its state");
    let stale = state.join("tpm2").join("stale-copy.permall");
    std::fs::write(&stale, &planted).expect("plant a stale state file");
    let witness = libvirt(&lab, "host1").dir.join("lib").join("stale-witness");
    std::fs::hard_link(&stale, &witness).expect("link the stale file from outside");

    // The migration's first connection is its session, the second
    // libvirt's control connection (joined right after the Accept).
    let control = mitm.log().connections + 2;
    let child = spawn_migrate_domain(&lab, "lost", "host1", "host2");
    wait_gate_opened(&lab, "host2");
    mitm.mute_down(control);
    let out = child.wait_with_output().expect("migrate");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the migration did not complete: {said}");
    wait_until(Duration::from_secs(90), "host1 to erase the vTPM clone", || {
        audit_kinds(&lab, "host1").iter().any(|e| e["kind"] == "vtpm_erased")
    });
    eprintln!(
        "lost Finish reply: migrate said {said}; host1 {:?}",
        domstate(&lab, "host1", "lost")
    );

    assert_eq!(domain_running_on(&lab, "lost"), ["host2"]);
    assert_vtpm_kept(&log);
    assert!(!state.exists(), "host1 kept vTPM state: {:?}", files_under(&state));
    let read_back = std::fs::read(&witness).expect("the witness link");
    assert_eq!(read_back.len(), planted.len(), "the stale file changed size");
    assert!(read_back.iter().all(|&b| b == 0), "the stale state was removed but not overwritten");
    let erased: Vec<_> =
        audit_kinds(&lab, "host1").into_iter().filter(|e| e["kind"] == "vtpm_erased").collect();
    assert_eq!(erased.len(), 1, "{erased:?}");
    let bytes = erased[0]["detail"]["bytes"].as_u64().unwrap_or(0);
    // The planted file and libvirt's own state (its permanent state at least).
    assert!(bytes > planted.len() as u64, "not every state file was erased: {erased:?}");
}

/// A vTPM whose state directory is on a network or cluster filesystem: a
/// destination that reaches the same files would hold the TPM twice. A real
/// FUSE mount (as GlusterFS or cephfs-fuse are) over libvirt's swtpm
/// directory on host1: the move is refused before any Offer, with the
/// reason, and the domain runs on.
#[test]
fn a_vtpm_on_a_fuse_filesystem_is_refused_before_the_offer() {
    let lab = TestLab::up_with(2, 0, &["--backend", "libvirt"]);
    let _fuse = FuseMount::over(&lab, "host1", "/var/lib/libvirt/swtpm");
    let log = start_tpm_domain(&lab, "host1", "shared", EMULATED);
    let (ok, rec) = lab.ferry_json(&["migrate", "shared", "--to", "host2", "--host", "host1"]);
    assert!(!ok, "a vTPM on FUSE moved: {rec}");
    let why = rec.to_string();
    assert!(why.contains("shared filesystem") && why.contains("fuse"), "no clear reason: {rec}");
    assert_eq!(domstate(&lab, "host1", "shared").as_deref(), Some("running"));
    assert_eq!(domstate(&lab, "host2", "shared"), None);
    assert!(records(&lab, "host2").is_empty(), "host2 heard of it: {:?}", records(&lab, "host2"));
    assert_guest_runs(&log);
}
