//! Lab hosts in network namespaces of their own (`ferry lab up --netns`):
//! a management and a migration network on lab-owned bridges, migrations
//! over the migration network only, links that fail and drop packets, and
//! `lab down` that leaves no namespace behind, also after a crash.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// An operator request sent by a peer (host1's certificate, from inside
/// host1's namespace) to host2's operator API address.
fn peer_asks_api(lab: &TestLab) -> Result<Value, String> {
    let (h1, h2) = (lab.host("host1"), lab.host("host2"));
    let (addr, ns) = (h2.addr, lab.netns("host1"));
    let run = || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let id = ferry_identity::Identity::load(&h1.cert, &h1.key, &lab.lab.ca, None)
                .expect("host1 identity");
            let cfg = ferry_identity::client_config(&id).expect("client config");
            let t = Duration::from_secs(10);
            let (stream, _) =
                ferry_agent::net::connect(addr, None, None, &h2.name, cfg, id.domain(), t)
                    .await
                    .map_err(|e| ferry_agent::report(&e))?;
            let (mut reader, mut writer) = ferry_agent::net::greet(stream, &h2.name, addr, t)
                .await
                .map_err(|e| ferry_agent::report(&e))?;
            let _ = writer.write_control(&serde_json::json!({"op": "status"})).await;
            let v: Value = reader.read_control().await.map_err(|e| ferry_agent::report(&e))?;
            match v["type"].as_str() {
                Some("error") => Err(v["message"].as_str().unwrap_or_default().to_owned()),
                _ => Ok(v),
            }
        })
    };
    ferry_cli::lab_netns::in_netns(&ns, run).expect("enter host1's namespace")
}

/// A migration between namespaced hosts goes over the migration network:
/// the management interfaces carry only the operator's requests. Agents,
/// swtpms and QEMUs run inside their hosts' namespaces, and a peer on the
/// operator API address is refused.
#[test]
fn migration_between_namespaced_hosts_uses_only_the_migration_network() {
    let t0 = Instant::now();
    let lab = TestLab::up_with(2, 0, &["--netns"]);
    let net = lab.lab.net.clone().expect("lab.json names the networks");
    for h in ["host1", "host2"] {
        let ns = lab.netns(h);
        assert!(ns.starts_with(&net.prefix), "{ns} lacks the lab's prefix {}", net.prefix);
        assert!(in_namespace(lab.agent_pid(h), &ns), "the agent of {h} is not in {ns}");
        assert!(!in_namespace(std::process::id() as i32, &ns), "the test itself is in {ns}");
    }
    let (ok, status) = lab.ferry_json(&["status", "--host", "host2"]);
    assert!(ok, "{status}");
    assert_eq!(status["api_listen"], lab.host("host2").addr.to_string());

    let src = lab.start_guest("host1", "g", 128, "fill_mib=48 dirty=16 hb_ms=10");
    let src_pid = src["pid"].as_i64().expect("pid") as i32;
    assert!(in_namespace(src_pid, &lab.netns("host1")), "the guest's QEMU is outside host1");

    let h1 = lab.netns("host1");
    let (mgmt_before, mig_before) = (if_bytes(&h1, "mgmt"), if_bytes(&h1, "mig"));
    let (ok, rec) = lab.ferry_json(&["migrate", "g", "--to", "host2", "--host", "host1"]);
    assert!(ok, "migration failed: {rec}");
    let (mgmt_after, mig_after) = (if_bytes(&h1, "mgmt"), if_bytes(&h1, "mig"));
    let moved = rec["bytes"].as_u64().expect("bytes");
    let mgmt = (mgmt_after.0 + mgmt_after.1) - (mgmt_before.0 + mgmt_before.1);
    let mig_sent = mig_after.1 - mig_before.1;
    eprintln!("moved {moved} B; host1 sent {mig_sent} B on mig, {mgmt} B on mgmt (both ways)");
    assert!(moved > 48 << 20, "less than the filled memory moved: {rec}");
    assert!(mig_sent >= moved, "the migration did not go over the migration network");
    assert!(mgmt < 1 << 20, "{mgmt} B on the management network during a migration");

    let id = rec["id"].as_str().expect("id").to_owned();
    assert_eq!(lab.running_on("g"), ["host2"]);
    let dst = live_qemus_under(&lab.host("host2").state_dir);
    assert_eq!(dst.len(), 1, "{dst:?}");
    assert!(in_namespace(dst[0], &lab.netns("host2")), "the destination QEMU is outside host2");
    assert_moved_intact(&lab, "g", &id);

    let e = peer_asks_api(&lab).expect_err("a peer on the operator API address");
    assert!(e.contains("peer agent on the operator API listener"), "{e}");
    eprintln!("took {:?}", t0.elapsed());
}

/// `lab up` killed half-way: `lab down` on its directory still deletes
/// every namespace it made (and with them the veths and bridges) and stops
/// what it had started inside them.
#[test]
fn lab_down_cleans_up_after_a_crashed_lab_up() {
    let dir = tempfile::Builder::new().prefix("ferry-netns-").tempdir_in("/tmp").expect("tmp");
    // Should an assertion fail, the directory still goes down before it is removed.
    struct Down<'a>(&'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = run(&["lab", "down", "--dir", self.0.to_str().expect("utf8")], None);
        }
    }
    let _down = Down(dir.path());
    let names = vec!["host1".parse().expect("name")];
    let prefix = ferry_cli::lab_netns::plan(dir.path(), &names).prefix;
    let mut up = Command::new(FERRY)
        .args(["lab", "up", "--netns", "--hosts", "1", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lab up");
    // Crash it once host1's namespace runs something (its swtpm).
    let host_ns = format!("{prefix}-host1");
    let started = |ns: &str| {
        let o = Command::new("ip").args(["netns", "pids", ns]).output().expect("ip");
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(60), "a process in host1's namespace", || {
        Path::new("/var/run/netns").join(&host_ns).exists() && !started(&host_ns).is_empty()
    });
    let orphans = started(&host_ns);
    up.kill().expect("kill lab up");
    let _ = up.wait();
    assert!(!Path::new(&dir.path().join("lab.json")).exists(), "lab up got too far");
    assert_eq!(namespaces_named(&prefix).len(), 3, "{:?}", namespaces_named(&prefix));

    let o = run(&["lab", "down", "--dir", dir.path().to_str().expect("utf8")], None);
    assert!(o.status.success(), "lab down on a crashed lab: {}", text(&o));
    assert!(namespaces_named(&prefix).is_empty(), "{:?}", namespaces_named(&prefix));
    wait_until(Duration::from_secs(5), "the crashed lab's processes to go", || {
        orphans.iter().all(|&p| !pid_alive(p))
    });
}
