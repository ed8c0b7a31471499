//! `ferry lab up --backend libvirt`: each lab host gets its own libvirtd,
//! in its own mount namespace, so that two libvirt "hosts" share this
//! machine without seeing each other: libvirt's directories and Ferry's
//! migration socket directory are the host's own inside it. The host's
//! agent runs in the same namespace, so it uses production's paths
//! (`qemu:///system`, `/run/libvirt`, `/run/ferry`) unchanged.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::procs::{pid_alive, signal};

/// Directories each libvirtd sees as its own, by where it sees them.
const PRIVATE: &[(&str, &str)] = &[
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("swtpm-log", "/var/log/swtpm"),
    ("ferry-run", "/run/ferry"),
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabLibvirt {
    /// Everything of this host's libvirt, outside the namespace.
    pub dir: PathBuf,
    pub pid: u32,
}

impl LabLibvirt {
    /// libvirt's socket, as seen from outside the namespace (for `virsh -c`).
    pub fn uri(&self) -> String {
        format!("qemu+unix:///system?socket={}", self.dir.join("run/libvirt-sock").display())
    }

    /// The command line prefix that runs a program inside this host.
    pub fn enter(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--mount=/proc/{}/ns/mnt", self.daemon()), "--".into()]
    }

    /// The libvirtd running now: `lab start` may have restarted it since
    /// the lab was written down.
    pub fn daemon(&self) -> i32 {
        read_pid(&self.dir.join(DAEMON_PID)).unwrap_or(self.pid as i32)
    }
}

/// Where the pid of the host's libvirtd (and so of its namespace) is kept.
const DAEMON_PID: &str = "daemon.pid";

/// The host's libvirtd, started again if it is not running (`lab start`
/// after a crash or a kill). Its domains' QEMUs, if they survived, are found
/// again by libvirt from its state directory, which is the host's own.
pub fn ensure(lv: &LabLibvirt) -> Result<LabLibvirt> {
    if pid_alive(lv.daemon()) {
        return Ok(lv.clone());
    }
    start(&lv.dir)
}

/// The libvirtds a `lab up` started so far; unless [`Started::keep`] is
/// called (the lab was written down, so `lab down` finds them), dropping
/// it stops them: a failed `lab up` leaves nothing running.
#[derive(Default)]
pub struct Started(Vec<LabLibvirt>);

impl Started {
    pub fn extend(&mut self, lv: Option<&LabLibvirt>) {
        self.0.extend(lv.cloned());
    }

    pub fn keep(mut self) {
        self.0.clear();
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for lv in &self.0 {
            stop(lv);
        }
    }
}

/// Start a libvirtd for a lab host in its own mount namespace.
pub fn start(dir: &Path) -> Result<LabLibvirt> {
    if which("libvirtd").is_none() {
        bail!("libvirtd is not installed (apt-get install libvirt-daemon-system)");
    }
    for (own, _) in PRIVATE {
        std::fs::create_dir_all(dir.join(own))?;
    }
    for (_, seen) in PRIVATE {
        // The mount points must exist outside for the bind mounts inside.
        std::fs::create_dir_all(seen).with_context(|| format!("cannot create {seen}"))?;
    }
    // A restarted host keeps its configuration, host UUID and domains.
    if !dir.join("etc/libvirtd.conf").exists() {
        copy_tree(Path::new("/etc/libvirt"), &dir.join("etc"))?;
        // No virtual networks: a lab host must not touch this machine's bridges.
        let _ = std::fs::remove_dir_all(dir.join("etc/qemu/networks/autostart"));
        std::fs::write(dir.join("etc/qemu.conf"), QEMU_CONF)?;
        std::fs::write(dir.join("etc/libvirtd.conf"), libvirtd_conf())?;
    }
    // libvirtd refuses to start when qemu.conf names a missing directory.
    std::fs::create_dir_all(dir.join("etc/migrate-tls"))?;
    let mut script = String::from("set -e\n");
    for (own, seen) in PRIVATE {
        script.push_str(&format!("mount --bind '{}' '{seen}'\n", dir.join(own).display()));
    }
    script.push_str("exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid\n");
    // A killed libvirtd leaves its socket behind: ready means a new one.
    let sock = dir.join("run/libvirt-sock");
    let _ = std::fs::remove_file(&sock);
    let out = std::fs::File::create(dir.join("libvirtd.out"))?;
    let child = std::process::Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("cannot start libvirtd")?;
    let lv = LabLibvirt { dir: dir.to_owned(), pid: child.id() };
    std::fs::write(dir.join(DAEMON_PID), child.id().to_string())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        if Instant::now() > deadline || !pid_alive(lv.pid as i32) {
            let out = std::fs::read_to_string(dir.join("libvirtd.out")).unwrap_or_default();
            bail!("libvirtd did not come up in {}:\n{out}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(lv)
}

/// Stop a host's domains' QEMUs and swtpms, then its libvirtd.
pub fn stop(lv: &LabLibvirt) {
    for sub in ["run/qemu", "run/qemu/swtpm"] {
        let Ok(entries) = std::fs::read_dir(lv.dir.join(sub)) else { continue };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                if let Some(pid) = read_pid(&e.path()) {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
    }
    let pid = read_pid(&lv.dir.join("run/libvirtd.pid")).unwrap_or(lv.daemon());
    signal(pid, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if pid_alive(pid) {
        signal(pid, libc::SIGKILL);
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(program)).find(|p| p.is_file())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("cannot copy {} to {}", from.display(), to.display());
    }
    Ok(())
}

fn libvirtd_conf() -> String {
    // Each daemon needs its own host UUID: libvirt refuses to migrate to a
    // daemon with its own.
    format!(
        "host_uuid = \"{}\"\nauth_unix_rw = \"none\"\nunix_sock_group = \"root\"\n\
         log_outputs = \"2:file:/var/log/libvirt/libvirtd.log\"\n",
        uuid_v4()
    )
}

/// The lab runs QEMU as root without confinement: this machine has no
/// SELinux/AppArmor profiles or cgroup delegation for a second libvirtd.
/// libvirt's own `--tls` migration (which the benchmark compares Ferry
/// with) reads its certificates from the host's `etc/migrate-tls`, empty
/// until someone puts them there.
const QEMU_CONF: &str = "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n\
remember_owner = 0\nsecurity_driver = \"none\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n\
stdio_handler = \"file\"\nswtpm_user = \"root\"\nswtpm_group = \"root\"\n\
migrate_tls_x509_cert_dir = \"/etc/libvirt/migrate-tls\"\nmigrate_tls_x509_verify = 1\n";

/// Define the lab's test guest as a persistent domain on a host and start
/// it; its console appends to `console` (the same path on every host, so
/// the guest's lines continue in one file after a migration).
pub fn start_domain(lv: &LabLibvirt, xml_dir: &Path, domain: &DomainSpec<'_>) -> Result<()> {
    let xml =
        domain_xml(domain.name, domain.kernel, domain.console, domain.memory_mib, domain.cmdline);
    let path = xml_dir.join(format!("{}.xml", domain.name));
    std::fs::write(&path, xml).with_context(|| format!("cannot write {}", path.display()))?;
    virsh(lv, &["define", &path.display().to_string()])?;
    virsh(lv, &["start", domain.name])
}

/// What `ferry lab domain` defines.
pub struct DomainSpec<'a> {
    pub name: &'a str,
    pub kernel: &'a Path,
    pub console: &'a Path,
    pub memory_mib: u32,
    pub cmdline: &'a str,
}

fn virsh(lv: &LabLibvirt, args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("virsh")
        .arg("-c")
        .arg(lv.uri())
        .args(args)
        .output()
        .context("cannot run virsh (apt-get install libvirt-clients)")?;
    if !o.status.success() {
        bail!("virsh {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

fn uuid_v4() -> String {
    use std::io::Read;
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A lab domain's XML: the test guest, its console in a file, Ferry's
/// labels in its metadata.
pub fn domain_xml(
    name: &str,
    kernel: &Path,
    console: &Path,
    memory_mib: u32,
    cmdline: &str,
) -> String {
    format!(
        "<domain type='qemu'>\n  <name>{name}</name>\n  <uuid>{}</uuid>\n  \
         <memory unit='MiB'>{memory_mib}</memory>\n  <vcpu>1</vcpu>\n  \
         <metadata><ferry:labels xmlns:ferry='https://ferry.dev/xmlns/labels/1' tenant='lab' \
         security-level='1'/></metadata>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{}</kernel>\
         <cmdline>{cmdline}</cmdline></os>\n  <devices>\n    \
         <serial type='file'><source path='{}' append='on'/><target port='0'/></serial>\n  </devices>\n</domain>\n",
        uuid_v4(),
        kernel.display(),
        console.display()
    )
}
