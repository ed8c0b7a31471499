//! Lab hosts in network namespaces (`ferry lab up --netns`).
//!
//! ```text
//! PREFIX-switch    br-mgmt (management) and br-mig (migration), no addresses
//! PREFIX-operator  mgmt 10.77.1.2/24 -> br-mgmt: where `ferry` reaches the agents
//! PREFIX-hostN     mgmt 10.77.1.(10+N)/24 -> br-mgmt, mig 10.77.2.(10+N)/24 -> br-mig,
//!                  lo; the agent, its swtpm and its QEMUs run here
//! ```
//!
//! Every interface is created inside a namespace the lab made (a veth is
//! created in one lab namespace with its peer in another), so nothing is
//! ever added to the root namespace and the machine's own interfaces are
//! never touched. The addresses are only routed inside these namespaces, so
//! they cannot clash with the machine's networks or with another lab's.
//! Deleting the namespaces deletes every veth and bridge in them.
//!
//! DIR/netns.json records the namespaces before any is made, so `lab down`
//! removes them also after a crash half-way through `lab up`.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_types::HostName;
use serde::{Deserialize, Serialize};

/// The operator API listener of every namespaced host.
pub const API_PORT: u16 = 7443;
/// The migration (peer) listener of every namespaced host.
pub const MIGRATION_PORT: u16 = 7444;
/// Prometheus metrics, on the management address.
pub const METRICS_PORT: u16 = 9464;
/// The host's swtpm, on the host namespace's own loopback.
pub const SWTPM_PORT: u16 = 2321;
/// The host-side names of the two interfaces.
pub const MGMT_IF: &str = "mgmt";
pub const MIGRATION_IF: &str = "mig";

const MGMT_NET: [u8; 3] = [10, 77, 1];
const MIGRATION_NET: [u8; 3] = [10, 77, 2];
const RECORD: &str = "netns.json";
const NETNS_DIR: &str = "/var/run/netns";

/// One host's namespace and addresses.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetHost {
    pub name: HostName,
    pub netns: String,
    pub mgmt: Ipv4Addr,
    pub migration: Ipv4Addr,
}

/// The lab's networks, as written to DIR/netns.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabNet {
    pub prefix: String,
    /// Holds the two bridges.
    pub switch: String,
    /// Where the operator CLI connects from.
    pub operator: String,
    pub operator_addr: Ipv4Addr,
    pub mgmt_subnet: String,
    pub migration_subnet: String,
    pub hosts: Vec<NetHost>,
}

impl LabNet {
    /// Every namespace the lab makes, the switch first.
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.switch.clone(), self.operator.clone()];
        all.extend(self.hosts.iter().map(|h| h.netns.clone()));
        all
    }

    pub fn host(&self, name: &HostName) -> Result<&NetHost> {
        self.hosts
            .iter()
            .find(|h| &h.name == name)
            .ok_or_else(|| anyhow!("no host {name} in the lab's networks"))
    }

    pub fn load(dir: &Path) -> Result<Option<LabNet>> {
        let path = dir.join(RECORD);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .with_context(|| format!("{} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

/// This process runs as root (/proc/self belongs to the effective user).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Whether hosts get namespaces, and the warning to print when they fall
/// back to loopback. Namespaces need root; libvirtd's QEMUs would stay
/// outside the host's namespace, so `--backend libvirt` keeps loopback.
pub fn choose(
    netns: bool,
    no_netns: bool,
    is_root: bool,
    libvirt: bool,
) -> Result<(bool, Option<&'static str>)> {
    match (netns, no_netns) {
        (true, true) => bail!("--netns and --no-netns contradict each other"),
        (true, false) if !is_root => {
            bail!("--netns needs root (it creates network namespaces); use --no-netns")
        }
        (true, false) if libvirt => {
            bail!("--netns does not support --backend libvirt yet; use --no-netns")
        }
        (true, false) => Ok((true, None)),
        (false, true) => Ok((false, None)),
        (false, false) if libvirt => Ok((false, None)),
        (false, false) if !is_root => Ok((
            false,
            Some("warning: not root, so the lab's hosts share loopback (no network namespaces)"),
        )),
        (false, false) => Ok((true, None)),
    }
}

/// The plan for `hosts` hosts. The prefix comes from the lab directory, so
/// two labs in two directories never share a namespace name.
pub fn plan(dir: &Path, hosts: &[HostName]) -> LabNet {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    let prefix = format!("ferry-{:08x}", h.finish() as u32);
    let addr = |net: [u8; 3], last: usize| Ipv4Addr::new(net[0], net[1], net[2], last as u8);
    LabNet {
        switch: format!("{prefix}-switch"),
        operator: format!("{prefix}-operator"),
        operator_addr: addr(MGMT_NET, 2),
        mgmt_subnet: format!("{}/24", addr(MGMT_NET, 0)),
        migration_subnet: format!("{}/24", addr(MIGRATION_NET, 0)),
        hosts: hosts
            .iter()
            .enumerate()
            .map(|(i, name)| NetHost {
                name: name.clone(),
                netns: format!("{prefix}-{name}"),
                mgmt: addr(MGMT_NET, 11 + i),
                migration: addr(MIGRATION_NET, 11 + i),
            })
            .collect(),
        prefix,
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2 is needed for --netns)")?;
    if !o.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

pub fn exists(ns: &str) -> bool {
    Path::new(NETNS_DIR).join(ns).exists()
}

/// Record the plan, then make the namespaces, bridges and veths.
pub fn create(dir: &Path, net: &LabNet) -> Result<()> {
    if let Some(taken) = net.namespaces().iter().find(|ns| exists(ns)) {
        bail!(
            "network namespace {taken} already exists: a lab in {} is up or crashed; \
             run `ferry lab down --dir {}`",
            dir.display(),
            dir.display()
        );
    }
    std::fs::write(dir.join(RECORD), serde_json::to_vec_pretty(net)?)?;
    for ns in net.namespaces() {
        // In a container without CAP_SYS_ADMIN even root cannot make one.
        ip(&["netns", "add", &ns]).context(
            "cannot create the lab's network namespaces (--no-netns keeps hosts on loopback)",
        )?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    let sw = net.switch.as_str();
    for bridge in ["br-mgmt", "br-mig"] {
        ip(&["-n", sw, "link", "add", bridge, "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", bridge, "up"])?;
    }
    let operator = [(net.operator.as_str(), "op", MGMT_IF, "br-mgmt", net.operator_addr)];
    let hosts = net.hosts.iter().flat_map(|h| {
        [
            (h.netns.as_str(), h.name.as_str(), MGMT_IF, "br-mgmt", h.mgmt),
            (h.netns.as_str(), h.name.as_str(), MIGRATION_IF, "br-mig", h.migration),
        ]
    });
    for (ns, who, iface, bridge, addr) in operator.into_iter().chain(hosts) {
        let port = format!("{who}-{iface}");
        ip(&["-n", sw, "link", "add", &port, "type", "veth", "peer", "name", iface, "netns", ns])?;
        ip(&["-n", sw, "link", "set", &port, "master", bridge, "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", iface])?;
        ip(&["-n", ns, "link", "set", iface, "up"])?;
    }
    Ok(())
}

/// Kill what still runs in the lab's namespaces (all of it started by the
/// lab), then delete them, and with them every veth and bridge. Returns
/// the namespaces deleted; a lab without namespaces deletes none.
pub fn destroy(dir: &Path) -> Result<Vec<String>> {
    let Some(net) = LabNet::load(dir)? else { return Ok(Vec::new()) };
    let mut deleted = Vec::new();
    for ns in net.namespaces().into_iter().filter(|ns| exists(ns)) {
        for pid in pids(&ns) {
            crate::procs::signal(pid, libc::SIGKILL);
        }
        ip(&["netns", "delete", &ns])?;
        deleted.push(ns);
    }
    std::fs::remove_file(dir.join(RECORD)).ok();
    Ok(deleted)
}

fn pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Bytes (received, sent) on interface `iface` inside namespace `ns`.
pub fn if_bytes(ns: &str, iface: &str) -> Result<(u64, u64)> {
    let o = Command::new("ip")
        .args(["-n", ns, "-j", "-s", "link", "show", "dev", iface])
        .output()
        .context("cannot run `ip`")?;
    if !o.status.success() {
        bail!("no interface {iface} in {ns}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).context("`ip -j` output")?;
    let bytes = |dir: &str| {
        v[0]["stats64"][dir]["bytes"]
            .as_u64()
            .ok_or_else(|| anyhow!("`ip -s link show {iface}` in {ns} has no {dir} byte count"))
    };
    Ok((bytes("rx")?, bytes("tx")?))
}

/// Run `f` on a thread of its own inside namespace `ns`: sockets it opens
/// and processes it spawns belong to that namespace. The thread ends with
/// `f`, so no other code ever runs in the namespace by accident.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path: PathBuf = Path::new(NETNS_DIR).join(ns);
    let file = std::fs::File::open(&path)
        .with_context(|| format!("network namespace {ns} does not exist ({})", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| {
            #[allow(unsafe_code)]
            // SAFETY: the descriptor is open for the whole call; setns
            // with CLONE_NEWNET changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(anyhow!("cannot enter network namespace {ns}: {e}"));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("a thread inside network namespace {ns} panicked"))?
    })
}

/// A TCP connection opened from inside namespace `ns`.
pub fn connect(ns: &str, addr: SocketAddr, timeout: Duration) -> Result<std::net::TcpStream> {
    in_netns(ns, || std::net::TcpStream::connect_timeout(&addr, timeout))?
        .with_context(|| format!("cannot connect to {addr} from network namespace {ns}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_gets_namespaces_by_default_and_others_loopback_with_a_warning() {
        assert_eq!(choose(false, false, true, false).unwrap(), (true, None));
        let (netns, warning) = choose(false, false, false, false).unwrap();
        assert!(!netns && warning.unwrap().contains("not root"));
        assert_eq!(choose(false, true, true, false).unwrap(), (false, None));
        assert_eq!(choose(false, false, true, true).unwrap(), (false, None));
    }

    #[test]
    fn impossible_requests_are_refused_by_name() {
        assert!(choose(true, true, true, false).unwrap_err().to_string().contains("contradict"));
        assert!(choose(true, false, false, false).unwrap_err().to_string().contains("root"));
        assert!(choose(true, false, true, true).unwrap_err().to_string().contains("libvirt"));
    }

    #[test]
    fn plans_of_two_labs_share_no_namespace_and_hosts_share_no_address() {
        let names: Vec<HostName> = ["host1", "host2"].iter().map(|n| n.parse().unwrap()).collect();
        let (a, b) = (plan(Path::new("/tmp/a"), &names), plan(Path::new("/tmp/b"), &names));
        assert!(a.namespaces().iter().all(|ns| !b.namespaces().contains(ns)));
        assert_eq!(a.namespaces().len(), 4);
        assert_eq!(a, plan(Path::new("/tmp/a"), &names), "the plan is a function of the dir");
        let addrs: Vec<Ipv4Addr> =
            a.hosts.iter().flat_map(|h| [h.mgmt, h.migration]).chain([a.operator_addr]).collect();
        let unique: std::collections::BTreeSet<_> = addrs.iter().collect();
        assert_eq!(unique.len(), addrs.len());
        assert!(a.hosts.iter().all(|h| h.mgmt.octets()[2] != h.migration.octets()[2]));
    }
}
