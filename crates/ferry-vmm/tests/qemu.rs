//! Real-QEMU tests (TCG). The guest boots from a raw disk of zeros: SeaBIOS
//! finds nothing bootable and idles, which is all these tests need.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_vmm::{
    adopt, launch, list, AccelChoice, Boot, LaunchMode, MachineType, MigrationState, QemuConfig,
    QemuProcess, Qmp, RunState, VmSpec, VmmError,
};

/// Kills every QEMU it holds when dropped, so a failing assertion never
/// leaves daemonized QEMUs behind.
#[derive(Default)]
struct Guard(Vec<QemuProcess>);

impl Guard {
    fn keep(&mut self, p: &QemuProcess) {
        self.0.push(p.clone());
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for p in &self.0 {
            if let Err(e) = p.kill() {
                eprintln!("failed to kill {}: {e}", p.pid);
            }
        }
    }
}

struct Host {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    images: PathBuf,
}

fn host() -> Host {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let images = root.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // A 1 MiB raw image of zeros.
    std::fs::write(images.join("zero.raw"), vec![0u8; 1 << 20]).unwrap();
    Host { _tmp: tmp, root, images }
}

fn config(h: &Host, run: &str) -> QemuConfig {
    QemuConfig {
        accel: AccelChoice::Tcg,
        images_dir: h.images.clone(),
        run_dir: h.root.join(run),
        ..QemuConfig::default()
    }
}

fn spec(name: &str, memory_mib: u32) -> VmSpec {
    VmSpec {
        name: name.parse().unwrap(),
        memory_mib,
        vcpus: 1,
        machine: MachineType::Q35,
        boot: Boot::Disk { image: "zero.raw".parse().unwrap(), bus: Default::default() },
    }
}

fn wait_dead(p: &QemuProcess) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.is_alive() {
        assert!(Instant::now() < deadline, "QEMU {} did not exit", p.pid);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn lifecycle_adopt_stop_cont_quit() {
    let h = host();
    let cfg = config(&h, "run");
    let mut guard = Guard::default();
    let t0 = Instant::now();
    let vm = launch(&cfg, &spec("life", 64), LaunchMode::Run).await.unwrap();
    guard.keep(&vm);
    eprintln!("launch took {:?}", t0.elapsed());
    assert!(vm.is_alive());
    assert!(vm.serial_path().exists());

    let mut qmp = vm.qmp().await.unwrap();
    assert_eq!(qmp.qemu_version().0, 7);
    assert_eq!(qmp.status().await.unwrap(), RunState::Running);

    // Unknown commands come back as a typed error naming the command.
    match qmp.execute("no-such-command", None).await {
        Err(VmmError::Qmp { command, class, desc }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    // The session survives an error reply.
    qmp.stop().await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), RunState::Paused);
    qmp.cont().await.unwrap();
    assert_eq!(qmp.status().await.unwrap(), RunState::Running);
    drop(qmp);

    // An agent restart: forget the handle, find the VM again by its dir.
    let pid = vm.pid;
    let dir = vm.dir.clone();
    drop(vm);
    let again = adopt(&dir).await.unwrap().expect("adopt finds the live QEMU");
    assert_eq!((again.pid, again.name.as_str()), (pid, "life"));
    assert_eq!(again.accel, ferry_vmm::Accel::Tcg);
    let all = list(&cfg).await.unwrap();
    assert_eq!(all, vec![again.clone()]);

    // A second launch of the same VM is refused while the first lives.
    match launch(&cfg, &spec("life", 64), LaunchMode::Run).await {
        Err(VmmError::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }

    let mut qmp = again.qmp().await.unwrap();
    qmp.quit().await.unwrap();
    wait_dead(&again);
    assert!(adopt(&dir).await.unwrap().is_none());
    assert!(list(&cfg).await.unwrap().is_empty());
    // QEMU removes its own pid file and sockets on a clean exit.
    assert!(!again.pid_path().exists());
    assert!(!again.qmp_path().exists());
}

#[tokio::test]
async fn kill_removes_sockets_and_relaunch_works() {
    let h = host();
    let cfg = config(&h, "run");
    let mut guard = Guard::default();
    let vm = launch(&cfg, &spec("victim", 32), LaunchMode::Run).await.unwrap();
    guard.keep(&vm);
    vm.kill().unwrap();
    assert!(!vm.is_alive());
    assert!(!vm.qmp_path().exists() && !vm.pid_path().exists() && !vm.serial_path().exists());
    // Killing twice is harmless.
    vm.kill().unwrap();

    let vm2 = launch(&cfg, &spec("victim", 32), LaunchMode::Run).await.unwrap();
    guard.keep(&vm2);
    assert_ne!(vm2.pid, vm.pid);
    assert!(vm2.is_alive());
}

#[tokio::test]
async fn launch_failure_reports_qemu_stderr() {
    let h = host();
    let cfg = config(&h, "run");
    let mut s = spec("broken", 32);
    s.boot = Boot::Disk { image: "missing.raw".parse().unwrap(), bus: Default::default() };
    match launch(&cfg, &s, LaunchMode::Run).await {
        Err(VmmError::LaunchFailed { stderr, .. }) => {
            assert!(stderr.contains("missing.raw"), "{stderr}")
        }
        other => panic!("expected LaunchFailed, got {other:?}"),
    }
}

#[tokio::test]
async fn adopt_refuses_dead_and_foreign_pids() {
    let h = host();
    let dir = h.root.join("run").join("ghost");
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("qemu.pid");

    assert!(adopt(&dir).await.unwrap().is_none(), "no pid file");
    assert!(adopt(&h.root.join("nowhere")).await.unwrap().is_none(), "no dir");

    // A pid that has exited.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    std::fs::write(&pid_file, format!("{dead}\n")).unwrap();
    assert!(adopt(&dir).await.unwrap().is_none(), "dead pid adopted");

    // A live pid that is not this dir's QEMU: the test process itself.
    std::fs::write(&pid_file, format!("{}\n", std::process::id())).unwrap();
    assert!(adopt(&dir).await.unwrap().is_none(), "foreign pid adopted");

    std::fs::write(&pid_file, "not a pid").unwrap();
    assert!(adopt(&dir).await.unwrap().is_none(), "garbage adopted");
}

#[tokio::test]
async fn adopt_refuses_another_vms_qemu() {
    let h = host();
    let cfg = config(&h, "run");
    let mut guard = Guard::default();
    let vm = launch(&cfg, &spec("owner", 32), LaunchMode::Run).await.unwrap();
    guard.keep(&vm);
    // Another VM's dir whose pid file points at `owner`'s live QEMU.
    let other = h.root.join("run").join("impostor");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("qemu.pid"), vm.pid.to_string()).unwrap();
    assert!(adopt(&other).await.unwrap().is_none());
    assert_eq!(adopt(&vm.dir).await.unwrap().map(|p| p.pid), Some(vm.pid));
}

async fn wait_status(qmp: &mut ferry_vmm::Qmp, want: RunState) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let st = qmp.status().await.unwrap();
        if st == want {
            return;
        }
        assert!(Instant::now() < deadline, "status {st:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn local_migration_between_two_qemus() {
    // Two "hosts": separate run dirs, same images dir (shared storage).
    let h = host();
    let src_cfg = config(&h, "src");
    let dst_cfg = config(&h, "dst");
    let vm = spec("mover", 256);
    let mut guard = Guard::default();

    let src = launch(&src_cfg, &vm, LaunchMode::Run).await.unwrap();
    guard.keep(&src);
    let dst = launch(&dst_cfg, &vm, LaunchMode::Incoming).await.unwrap();
    guard.keep(&dst);

    let mut qd = dst.qmp().await.unwrap();
    assert_eq!(qd.status().await.unwrap(), RunState::InMigrate);
    let before = qd.query_migrate().await.unwrap();
    assert_eq!(before.status, MigrationState::None);
    let uri = format!("unix:{}", dst.dir.join("in.sock").display());
    qd.migrate_incoming(&uri).await.unwrap();

    let mut qs = src.qmp().await.unwrap();
    qs.set_migration_parameters(src_cfg.max_bandwidth_bytes_per_s, src_cfg.downtime_limit_ms)
        .await
        .unwrap();
    qs.set_capabilities(&[("events", true)]).await.unwrap();
    // post-copy + multifd is refused before QEMU sees it.
    let err = qs.set_capabilities(&[("postcopy-ram", true), ("multifd", true)]).await.unwrap_err();
    assert!(matches!(err, VmmError::UnsafeCapabilities(_)), "{err}");

    let t0 = Instant::now();
    qs.migrate(&uri).await.unwrap();
    let (mut qs, done) = wait_done(qs, Duration::from_secs(20)).await;
    let elapsed = t0.elapsed();
    let ram = done.ram.clone().unwrap_or_default();
    eprintln!(
        "migration: {elapsed:?}, total-time {:?} ms, downtime {:?} ms, total {} transferred {} iterations {}",
        done.total_time, done.downtime, ram.total, ram.transferred, ram.dirty_sync_count
    );
    // RAM total also counts ROMs and other RAM blocks (about +512 KiB).
    assert!(ram.total >= 256 << 20, "{}", ram.total);
    assert!(ram.dirty_sync_count >= 1);
    // With `events` on, the source announced the state changes.
    let events: Vec<String> = qs.drain_events().into_iter().map(|e| e.event).collect();
    assert!(events.iter().any(|e| e == "MIGRATION"), "{events:?}");

    let (mut qd, dst_done) = wait_done(qd, Duration::from_secs(10)).await;
    eprintln!("destination query-migrate after incoming: {dst_done:?}");

    // -S: the destination holds the guest paused until the agent says so.
    wait_status(&mut qd, RunState::Paused).await;
    assert_eq!(qs.status().await.unwrap(), RunState::PostMigrate);
    qd.cont().await.unwrap();
    assert_eq!(qd.status().await.unwrap(), RunState::Running);

    assert_quirk_source_cont(&mut qs).await;
}

/// QEMU 7.2 accepts `cont` on a source in `postmigrate` and would resume
/// the stale copy; here it is only stopped because the running destination
/// holds the shared image's write lock. The agent must never rely on that.
async fn assert_quirk_source_cont(qs: &mut ferry_vmm::Qmp) {
    match qs.cont().await {
        Err(VmmError::Qmp { desc, .. }) => assert!(desc.contains("lock"), "{desc}"),
        other => panic!("expected the image lock to refuse cont, got {other:?}"),
    }
    assert_eq!(qs.status().await.unwrap(), RunState::PostMigrate);
}

/// The dangerous ordering: the source is resumed while the destination is
/// still paused. By default QEMU 7.2's destination activates (and locks) the
/// images as soon as the state has arrived, even with -S, so the source's
/// `cont` fails on the lock. With `late-block-activate` on the destination
/// nothing stops the stale source from running; the destination's later
/// `cont` is what fails. Without shared, locking storage neither fails.
#[tokio::test]
async fn source_cont_in_postmigrate_resumes_the_stale_copy() {
    let h = host();
    let (src_cfg, dst_cfg) = (config(&h, "src"), config(&h, "dst"));
    let vm = spec("stale", 64);
    let mut guard = Guard::default();
    let src = launch(&src_cfg, &vm, LaunchMode::Run).await.unwrap();
    guard.keep(&src);
    let dst = launch(&dst_cfg, &vm, LaunchMode::Incoming).await.unwrap();
    guard.keep(&dst);
    let (mut qs, mut qd) = (src.qmp().await.unwrap(), dst.qmp().await.unwrap());
    let uri = format!("unix:{}", dst.dir.join("in.sock").display());
    qd.set_capabilities(&[("late-block-activate", true)]).await.unwrap();
    qd.migrate_incoming(&uri).await.unwrap();
    qs.set_migration_parameters(src_cfg.max_bandwidth_bytes_per_s, src_cfg.downtime_limit_ms)
        .await
        .unwrap();
    qs.migrate(&uri).await.unwrap();
    let (mut qs, _) = wait_done(qs, Duration::from_secs(20)).await;
    let (mut qd, _) = wait_done(qd, Duration::from_secs(10)).await;
    wait_status(&mut qd, RunState::Paused).await;

    qs.cont().await.unwrap();
    assert_eq!(qs.status().await.unwrap(), RunState::Running);
    let err = qd.cont().await.unwrap_err();
    assert!(matches!(&err, VmmError::Qmp { desc, .. } if desc.contains("lock")), "{err}");
}

/// Wait for the migration through the shared-handle helper the agent uses.
async fn wait_done(q: Qmp, timeout: Duration) -> (Qmp, ferry_vmm::MigrationStatus) {
    let shared = tokio::sync::Mutex::new(q);
    let st =
        ferry_vmm::wait_migration_done(&shared, Duration::from_millis(20), timeout).await.unwrap();
    (shared.into_inner(), st)
}
