//! docs/deploy.md, run as written: every ```` ```sh deploy=MACHINE ```` block, in
//! order, on the machine it names, with nothing from `ferry lab`.
//!
//! The machines are directories on this one: host1 and host2 (each with its own
//! `/etc/ferry` and `/var/lib/ferry` under its directory, its own swtpm and its own
//! agent, started by hand as the guide says), the admin machine and the operator's
//! workstation. What is substituted, and nothing else: those two directory roots,
//! the hosts' addresses (10.0.0.N:7101 becomes a loopback port), the swtpm and
//! metrics ports (each host needs its own here), `HOST=host1` on host2, and `scp`,
//! which copies between the machines' directories. Then the test checks that the
//! VM moved, attested, authorized and audited.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{live_qemus_under, pid_alive, FERRY};
use serde_json::Value;

const GUIDE: &str = include_str!("../docs/deploy.md");

/// One ```` ```sh deploy=MACHINE ```` block.
#[derive(Debug)]
struct Block {
    machine: String,
    script: String,
}

/// The guide's runnable blocks, in order.
fn blocks(guide: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in guide.lines() {
        match &mut current {
            None => {
                if let Some(machine) = line.strip_prefix("```sh deploy=") {
                    current = Some(Block { machine: machine.trim().into(), script: String::new() });
                }
            }
            Some(b) if line.trim_end() == "```" => {
                out.push(std::mem::replace(
                    b,
                    Block { machine: String::new(), script: String::new() },
                ));
                current = None;
            }
            Some(b) => {
                b.script.push_str(line);
                b.script.push('\n');
            }
        }
    }
    assert!(current.is_none(), "docs/deploy.md: a deploy block is not closed");
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Host {
    name: String,
    root: PathBuf,
    agent_port: u16,
    metrics_port: u16,
    swtpm_port: u16,
}

impl Host {
    fn state(&self) -> PathBuf {
        self.root.join("var/lib/ferry")
    }
}

/// The machines, and everything they run: stopped on drop, also when the test fails.
struct Cluster {
    dir: tempfile::TempDir,
    hosts: Vec<Host>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::Builder::new().prefix("ferry-deploy-").tempdir_in("/tmp").expect("tmp");
        let hosts = ["host1", "host2"]
            .iter()
            .map(|name| {
                let root = dir.path().join(name);
                std::fs::create_dir_all(root.join("root")).expect("host dir");
                Host {
                    name: (*name).into(),
                    root,
                    agent_port: free_port(),
                    metrics_port: free_port(),
                    swtpm_port: ferry_attest::free_port_pair().expect("swtpm ports"),
                }
            })
            .collect();
        for m in ["admin", "operator", "bin"] {
            std::fs::create_dir_all(dir.path().join(m)).expect("dir");
        }
        let c = Cluster { dir, hosts };
        c.write_scp();
        c
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// `scp` between the machines' directories: `[user@]ADDRESS:PATH` with an
    /// absolute PATH is under that machine's root, a relative one under its home.
    fn write_scp(&self) {
        let mut cases = String::new();
        for (i, h) in self.hosts.iter().enumerate() {
            cases.push_str(&format!(
                "    10.0.0.{}) root={r}; home={r}/root ;;\n",
                i + 1,
                r = h.root.display()
            ));
        }
        cases.push_str(&format!(
            "    workstation) root={o}; home={o} ;;\n",
            o = self.path("operator").display()
        ));
        let script = format!(
            "#!/bin/bash\n# scp for tests/deploy_guide.rs: the guide's machines are directories.\n\
             set -e\nargs=()\nfor a in \"$@\"; do\n  case \"$a\" in\n  -*) args+=(\"$a\") ;;\n  \
             *:*)\n    host=\"${{a%%:*}}\"; host=\"${{host#*@}}\"; path=\"${{a#*:}}\"\n    \
             case \"$host\" in\n{cases}    *) echo \"scp: unknown host $host\" >&2; exit 1 ;;\n    \
             esac\n    case \"$path\" in /*) args+=(\"$root$path\") ;; *) args+=(\"$home/$path\") ;; esac ;;\n  \
             *) args+=(\"$a\") ;;\n  esac\ndone\nexec cp \"${{args[@]}}\"\n"
        );
        let path = self.path("bin/scp");
        std::fs::write(&path, script).expect("scp");
        let chmod = Command::new("chmod").arg("755").arg(&path).status().expect("chmod");
        assert!(chmod.success());
    }

    /// The block's text as it runs on `host` (None: the admin machine or the workstation).
    fn localize(&self, script: &str, host: Option<&Host>) -> String {
        let mut s = script.to_owned();
        for (i, h) in self.hosts.iter().enumerate() {
            s = s
                .replace(&format!("10.0.0.{}:7101", i + 1), &format!("127.0.0.1:{}", h.agent_port));
        }
        if let Some(h) = host {
            let root = h.root.display().to_string();
            s = s
                .replace("/etc/ferry", &format!("{root}/etc/ferry"))
                .replace("/var/lib/ferry", &format!("{root}/var/lib/ferry"))
                .replace("port=2321", &format!("port={}", h.swtpm_port))
                .replace("port=2322", &format!("port={}", h.swtpm_port + 1))
                .replace("127.0.0.1:9464", &format!("127.0.0.1:{}", h.metrics_port))
                .replace("HOST=host1\n", &format!("HOST={}\n", h.name));
        }
        s
    }

    fn run(&self, block: &Block, host: Option<&Host>) -> Output {
        let (cwd, home) = match (host, block.machine.as_str()) {
            (Some(h), _) => (h.root.join("root"), h.root.join("root")),
            (None, m) => (self.path(m), self.path(m)),
        };
        let ferry_dir = Path::new(FERRY).parent().expect("ferry dir");
        let path = format!(
            "{}:{}:{}",
            self.path("bin").display(),
            ferry_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let script = self.localize(&block.script, host);
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", &script])
            .current_dir(cwd)
            .env("HOME", home)
            .env("PATH", path)
            .env_remove("FERRY_CLIENT_CONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("bash");
        let on = host.map(|h| h.name.as_str()).unwrap_or(&block.machine);
        assert!(
            out.status.success(),
            "docs/deploy.md block on {on} failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Shown with --nocapture: what the guide's commands print.
        eprintln!("--- on {on}:\n{}", String::from_utf8_lossy(&out.stdout));
        out
    }

    /// The guide starts the agent in the background; wait until it serves.
    fn wait_ready(&self, h: &Host) {
        let log = h.state().join("agent.log");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("agent ready") {
                return;
            }
            let alive = pid(&h.state().join("agent.pid")).is_some_and(pid_alive);
            assert!(
                alive && Instant::now() < deadline,
                "agent of {} did not come up:\n{text}",
                h.name
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ferry(&self, args: &[&str]) -> Value {
        let out = Command::new(FERRY)
            .args(args)
            .arg("--json")
            .env("FERRY_CLIENT_CONFIG", self.path("operator/alice/client.toml"))
            .stdin(Stdio::null())
            .output()
            .expect("ferry");
        serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
            Value::String(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }
}

fn pid(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn kill(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for h in &self.hosts {
            let state = h.state();
            // Only what this test started: by pid file, or QEMUs under this host's state.
            for file in [state.join("agent.pid"), state.join("swtpm/swtpm.pid")] {
                if let Some(p) = pid(&file) {
                    kill(p);
                }
            }
            for p in live_qemus_under(&state) {
                kill(p);
            }
        }
    }
}

/// Start `ferry agent` on a copy of `h`'s agent.toml with `edits` (and a
/// state directory of its own, so a start that should fail cannot touch the
/// host's); it must exit at once, naming the problem and its fix.
fn refuses_to_start(c: &Cluster, h: &Host, case: &str, edits: &[(String, String)], expect: &str) {
    let cfg = h.root.join("etc/ferry/agent.toml");
    let mut text = std::fs::read_to_string(&cfg).expect("agent.toml");
    let state = h.state().display().to_string();
    let own = c.path(&format!("bad-{case}"));
    for (from, to) in [(format!("\"{state}\""), format!("\"{}\"", own.display()))]
        .iter()
        .chain(
            [(format!("\"{state}/audit.log\""), format!("\"{}/audit.log\"", own.display()))].iter(),
        )
        .chain(edits)
    {
        assert!(text.contains(from.as_str()), "{case}: {from} not in {}", cfg.display());
        text = text.replace(from.as_str(), to);
    }
    let path = c.path(&format!("bad-{case}.toml"));
    std::fs::write(&path, text).expect("write");
    let mut child = Command::new(FERRY)
        .args(["agent", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{case}: the agent started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{case}: exit {}", out.status);
    assert!(err.contains(expect) && err.contains("fix:"), "{case}: {expect:?} not in:\n{err}");
}

#[test]
fn the_deploy_guide_migrates_a_vm_attested_authorized_and_audited() {
    let blocks = blocks(GUIDE);
    let all: String = blocks.iter().map(|b| b.script.as_str()).collect();
    for step in ["ferry ca init", "ferry host init", "ferry agent --config", "ferry migrate"] {
        assert!(all.contains(step), "docs/deploy.md runs no `{step}`");
    }
    let c = Cluster::new();
    for b in &blocks {
        match b.machine.as_str() {
            "each-host" => {
                for h in &c.hosts {
                    c.run(b, Some(h));
                    if b.script.contains("ferry agent --config") {
                        c.wait_ready(h);
                    }
                }
            }
            "admin" | "operator" => {
                c.run(b, None);
            }
            other => panic!("docs/deploy.md: unknown machine deploy={other}"),
        }
    }

    // Moved: web runs on host2 and nowhere else, and its agents agree.
    let on = |host: &str| -> Vec<String> {
        let v = c.ferry(&["vm", "list", "--host", host]);
        v["vms"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|vm| vm["state"] == "running")
            .map(|vm| vm["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(on("host2"), ["web"], "web does not run on host2");
    assert!(on("host1").is_empty(), "web still runs on host1");

    // Attested: the source verified host2's quote, and nothing ran insecurely.
    let list = c.ferry(&["migrations", "list", "--host", "host1"]);
    let migrations = list["migrations"].as_array().cloned().unwrap_or_default();
    let rec = migrations.iter().find(|m| m["vm"] == "web").expect("web's migration").clone();
    assert_eq!(rec["state"], "completed", "{rec}");
    assert_eq!(rec["attestation"]["peer_verified"], true, "{rec}");
    assert_eq!(rec["insecure"], serde_json::json!([]), "{rec}");
    assert!(rec["receipt"].is_object(), "no signed receipt: {rec}");
    let id = rec["id"].as_str().expect("id").to_owned();

    // Authorized: the agents decide by the guide's policy. A VM limited to a
    // zone host2 is not in is denied before host2 is contacted.
    let status = c.ferry(&["status", "--host", "host2"]);
    let checks = status["checks"].as_array().cloned().unwrap_or_default();
    assert!(!checks.is_empty(), "no start-up checks in status: {status}");
    assert!(checks.iter().all(|k| k["verdict"] == "ok"), "a check is not ok: {status}");
    let started = c.ferry(&[
        "vm",
        "start",
        "--host",
        "host2",
        "--name",
        "zoned",
        "--memory",
        "64",
        "--kernel",
        "ferry-guest.elf",
        "--cmdline",
        "fill_mib=8 dirty=1 hb_ms=100 tlbflush=1",
        "--zone",
        "zone-9",
    ]);
    assert_eq!(started["name"], "zoned", "{started}");
    let denied = c.ferry(&["migrate", "zoned", "--to", "host1", "--host", "host2"]);
    assert!(
        denied["message"].as_str().is_some_and(
            |m| m.contains("destination host must be in one of the VM's allowed zones")
        ),
        "the zone policy did not decide: {denied}"
    );

    // Audited: both logs intact and agreeing on the migration; the denied
    // request is in host2's log only, and the warning says that is expected.
    let admin = c.path("admin");
    for (i, h) in c.hosts.iter().enumerate() {
        std::fs::copy(h.state().join("audit.log"), admin.join(format!("host{}-audit.log", i + 1)))
            .expect("copy log");
    }
    let out = Command::new(FERRY)
        .current_dir(&admin)
        .args([
            "audit",
            "verify",
            "host1-audit.log",
            "host2-audit.log",
            "--ca",
            "ca/ca.pem",
            "--json",
        ])
        .output()
        .expect("audit verify");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    let cross = &v["cross_check"];
    let checked = cross["migrations"].as_array().cloned().unwrap_or_default();
    let m = checked.iter().find(|m| m["migration_id"] == id.as_str()).expect("in both logs");
    assert_eq!(m["outcome"], "completed", "{v}");
    for kind in ["offer", "accept", "commit", "receipt"] {
        assert!(m["agreed"].as_array().is_some_and(|a| a.iter().any(|k| k == kind)), "{kind}: {v}");
    }
    let warnings = cross["warnings"].as_array().cloned().unwrap_or_default();
    assert!(
        warnings.iter().any(|w| w.as_str().is_some_and(|w| w.contains("(denied): expected"))),
        "the denied request's warning: {v}"
    );

    // Fail fast: the mistakes a newcomer makes stop the agent at start, each
    // named with its fix, instead of surfacing at the first migration.
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let etc = |h: &Host, f: &str| h.root.join("etc/ferry").join(f).display().to_string();
    let swap = |a: String, b: String| (format!("\"{a}\""), format!("\"{b}\""));
    refuses_to_start(
        &c,
        h1,
        "cert",
        &[
            swap(etc(h1, "host1.pem"), etc(h2, "host2.pem")),
            swap(etc(h1, "host1.key"), etc(h2, "host2.key")),
        ],
        "is for spiffe://ferry.example/host/host2, but [host] name is host1",
    );
    let other = c.path("other-ca");
    let o = Command::new(FERRY)
        .args(["ca", "init", "--domain", "ferry.example", "--dir"])
        .arg(&other)
        .output()
        .expect("ca init");
    assert!(o.status.success());
    refuses_to_start(
        &c,
        h1,
        "ca",
        &[swap(etc(h1, "ca.pem"), other.join("ca.pem").display().to_string())],
        "was not issued by the CA in",
    );
    let tcti = |port: u16| format!("swtpm:host=127.0.0.1,port={port}");
    let closed = free_port();
    refuses_to_start(
        &c,
        h1,
        "tpm",
        &[swap(tcti(h1.swtpm_port), tcti(closed))],
        &format!("nothing accepts connections on 127.0.0.1:{closed}"),
    );
    let images = h1.state().join("images").display().to_string();
    refuses_to_start(
        &c,
        h1,
        "images",
        &[swap(images.clone(), format!("{images}-missing"))],
        "images: ",
    );
}
