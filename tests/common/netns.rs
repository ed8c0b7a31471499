//! Lab hosts in network namespaces (`ferry lab up --netns`): which
//! namespace a process is in, interface byte counters, `ferry lab link`.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use super::{run, text, TestLab};

/// The namespace file's identity (device, inode): two paths name the same
/// network namespace when these are equal.
fn ns_id(path: &Path) -> (u64, u64) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// `pid` runs in network namespace `ns`.
pub fn in_namespace(pid: i32, ns: &str) -> bool {
    ns_id(&Path::new("/proc").join(pid.to_string()).join("ns/net"))
        == ns_id(&Path::new("/var/run/netns").join(ns))
}

/// Bytes (received, sent) on interface `iface` inside namespace `ns`.
pub fn if_bytes(ns: &str, iface: &str) -> (u64, u64) {
    let o = Command::new("ip")
        .args(["-n", ns, "-j", "-s", "link", "show", "dev", iface])
        .output()
        .expect("run ip");
    assert!(o.status.success(), "ip link show {iface} in {ns}: {}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ip -j output");
    let stats = &v[0]["stats64"];
    let bytes = |dir: &str| stats[dir]["bytes"].as_u64().expect("byte counter");
    (bytes("rx"), bytes("tx"))
}

/// Namespaces whose names start with `prefix`.
pub fn namespaces_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Links in this (the machine's root) namespace named as the lab names
/// its bridges and veths: there must never be any.
pub fn lab_links_in_root_namespace() -> Vec<String> {
    let o = Command::new("ip").args(["-j", "link", "show"]).output().expect("run ip");
    assert!(o.status.success(), "ip link show: {}", text(&o));
    let links: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).expect("ip -j output");
    let lab_named = |n: &str| {
        ["br-mgmt", "br-mig", "mgmt", "mig"].contains(&n)
            || n.ends_with("-mgmt")
            || n.ends_with("-mig")
    };
    links
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| lab_named(n))
        .map(str::to_owned)
        .collect()
}

impl TestLab {
    /// The host's network namespace.
    pub fn netns(&self, host: &str) -> String {
        self.host(host).netns.clone().expect("a lab made with --netns")
    }

    /// `ferry lab link --dir DIR HOST ARGS...`; returns what it printed.
    pub fn link(&self, host: &str, args: &[&str]) -> String {
        let dir = self.dir.path().to_str().expect("utf8");
        let mut a = vec!["lab", "link", "--dir", dir, host];
        a.extend(args);
        let o = run(&a, None);
        assert!(o.status.success(), "lab link {host} {args:?}: {}", text(&o));
        text(&o)
    }
}
