//! swtpm for tests, the lab and the demo: a local "TPM manufacturer" CA,
//! provisioning (EK + EK certificate signed by that CA), and a TCP daemon per
//! host.
//!
//! Everything lives in directories the caller names. swtpm_setup is always
//! given our own config files, because its defaults write to /var/lib and /etc
//! and would make hosts share one CA state.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::registry::write_atomic;
use crate::AttestError;

const CA_CERT: &str = "tpm-manufacturer-ca.pem";
const CA_KEY: &str = "tpm-manufacturer-ca.key";
const LOCALCA_CONF: &str = "swtpm-localca.conf";
const LOCALCA_OPTIONS: &str = "swtpm-localca.options";
const SETUP_CONF: &str = "swtpm_setup.conf";
const PID_FILE: &str = "swtpm.pid";
const LOG_FILE: &str = "swtpm.log";
/// swtpm control-channel command CMD_SHUTDOWN (swtpm's tpm_ioctl.h).
const CMD_SHUTDOWN: u32 = 3;

fn swtpm_err(why: impl Into<String>) -> AttestError {
    AttestError::Swtpm { why: why.into() }
}

fn utf8(path: &Path) -> Result<&str, AttestError> {
    path.to_str().ok_or_else(|| swtpm_err(format!("{} is not UTF-8", path.display())))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), AttestError> {
    write_atomic(path, text.as_bytes(), mode)
}

/// A running swtpm daemon. Stopped on drop unless [`Swtpm::detach`]ed.
#[derive(Debug)]
pub struct Swtpm {
    pub dir: PathBuf,
    pub port: u16,
    pid: u32,
    stop_on_drop: bool,
}

impl Swtpm {
    /// Create (once; later calls reuse it) a local TPM-manufacturer CA in
    /// `dir` plus the swtpm_localca configuration that signs EK certificates
    /// with it. Returns the CA certificate (PEM) to trust for enrollment.
    pub fn manufacturer_ca_init(dir: &Path) -> Result<PathBuf, AttestError> {
        std::fs::create_dir_all(dir).map_err(|e| AttestError::io(dir, e))?;
        let dir = dir.canonicalize().map_err(|e| AttestError::io(dir, e))?;
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if !cert_path.exists() || !key_path.exists() {
            let gen = |e: rcgen::Error| swtpm_err(format!("generating the manufacturer CA: {e}"));
            let key = rcgen::KeyPair::generate().map_err(gen)?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(rcgen::DnType::OrganizationName, "Ferry lab");
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "Ferry lab TPM manufacturer CA");
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages =
                vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).map_err(gen)?;
            // The key signs EK certificates: whoever reads it can mint "TPMs".
            write(&key_path, &key.serialize_pem(), 0o600)?;
            write(&cert_path, &cert.pem(), 0o644)?;
        }
        let conf = format!(
            "statedir = {d}\nsigningkey = {k}\nissuercert = {c}\ncertserial = {d}/certserial\n",
            d = utf8(&dir)?,
            k = utf8(&key_path)?,
            c = utf8(&cert_path)?,
        );
        write(&dir.join(LOCALCA_CONF), &conf, 0o644)?;
        let options =
            "--platform-manufacturer Ferry\n--platform-version 2.1\n--platform-model swtpm\n";
        write(&dir.join(LOCALCA_OPTIONS), options, 0o644)?;
        Ok(cert_path)
    }

    /// Manufacture a TPM in `state_dir`: EKs, EK certificates signed by the CA
    /// made by [`Swtpm::manufacturer_ca_init`], a SHA-256 PCR bank. Overwrites
    /// any previous state there.
    pub fn provision(state_dir: &Path, manufacturer_ca_dir: &Path) -> Result<(), AttestError> {
        std::fs::create_dir_all(state_dir).map_err(|e| AttestError::io(state_dir, e))?;
        let state_dir = state_dir.canonicalize().map_err(|e| AttestError::io(state_dir, e))?;
        let ca_dir = manufacturer_ca_dir
            .canonicalize()
            .map_err(|e| AttestError::io(manufacturer_ca_dir, e))?;
        if !ca_dir.join(LOCALCA_CONF).exists() {
            return Err(swtpm_err(format!(
                "{} holds no manufacturer CA: run manufacturer_ca_init first",
                ca_dir.display()
            )));
        }
        let setup_conf = format!(
            "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\n",
            utf8(&ca_dir.join(LOCALCA_CONF))?,
            utf8(&ca_dir.join(LOCALCA_OPTIONS))?,
        );
        let conf_path = state_dir.join(SETUP_CONF);
        write(&conf_path, &setup_conf, 0o644)?;
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--tpmstate"])
            .arg(&state_dir)
            .args([
                "--create-ek-cert",
                "--create-platform-cert",
                "--overwrite",
                "--pcr-banks",
                "sha256",
            ])
            .arg("--config")
            .arg(&conf_path)
            .output()
            .map_err(|e| {
                swtpm_err(format!("cannot run swtpm_setup (is swtpm-tools installed?): {e}"))
            })?;
        if !out.status.success() {
            return Err(swtpm_err(format!(
                "swtpm_setup failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Start swtpm on 127.0.0.1:`port` (control channel on `port`+1), already
    /// initialised and started up, as a daemon with a pid file in `state_dir`.
    pub fn start(state_dir: &Path, port: u16) -> Result<Swtpm, AttestError> {
        let ctrl = port
            .checked_add(1)
            .ok_or_else(|| swtpm_err("port must leave room for the control port"))?;
        let dir = state_dir.canonicalize().map_err(|e| AttestError::io(state_dir, e))?;
        let pid_path = dir.join(PID_FILE);
        let _ = std::fs::remove_file(&pid_path);
        let out = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", utf8(&dir)?))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .args(["--flags", "not-need-init,startup-clear", "--daemon", "--pid"])
            .arg(format!("file={}", utf8(&pid_path)?))
            .arg("--log")
            .arg(format!("file={},level=1", utf8(&dir.join(LOG_FILE))?))
            .output()
            .map_err(|e| swtpm_err(format!("cannot run swtpm (is it installed?): {e}")))?;
        if !out.status.success() {
            return Err(swtpm_err(format!(
                "swtpm on port {port} failed to start ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = loop {
            if let Ok(text) = std::fs::read_to_string(&pid_path) {
                if let Ok(pid) = text.trim().parse::<u32>() {
                    break pid;
                }
            }
            if Instant::now() > deadline {
                return Err(swtpm_err(format!("swtpm on port {port} wrote no pid file")));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let tpm = Swtpm { dir, port, pid, stop_on_drop: true };
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if Instant::now() > deadline {
                return Err(swtpm_err(format!("swtpm on port {port} does not accept connections")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(tpm)
    }

    /// Start on a free port pair, retrying if another process takes the port
    /// between probing and binding (tests run in parallel).
    pub fn start_on_free_port(state_dir: &Path) -> Result<Swtpm, AttestError> {
        let mut last = swtpm_err("no free port pair found");
        for _ in 0..8 {
            let port = free_port_pair()?;
            match Swtpm::start(state_dir, port) {
                Ok(t) => return Ok(t),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// The pid a daemon started on `state_dir` recorded, whether or not it
    /// still runs (and whichever network namespace it listens in).
    pub fn recorded_pid(state_dir: &Path) -> Option<u32> {
        std::fs::read_to_string(state_dir.join(PID_FILE)).ok()?.trim().parse().ok()
    }

    /// Take over a daemon started earlier (e.g. by `ferry lab up`) from its
    /// pid file, if it is still running. The result is detached: dropping it
    /// leaves the daemon running.
    pub fn adopt(state_dir: &Path, port: u16) -> Result<Option<Swtpm>, AttestError> {
        let dir = state_dir.canonicalize().map_err(|e| AttestError::io(state_dir, e))?;
        let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else {
            return Ok(None);
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            return Ok(None);
        };
        if !Path::new(&format!("/proc/{pid}")).exists()
            || TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err()
        {
            return Ok(None);
        }
        Ok(Some(Swtpm { dir, port, pid, stop_on_drop: false }))
    }

    /// TCTI string for tss-esapi.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Leave the daemon running after this value is dropped.
    pub fn detach(mut self) {
        self.stop_on_drop = false;
    }

    /// Shut the daemon down: CMD_SHUTDOWN on the control channel (swtpm saves
    /// its state and exits), then SIGKILL by pid if it is still there.
    pub fn stop(&self) {
        if let Some(ctrl) = self.port.checked_add(1) {
            if let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, ctrl)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                if s.write_all(&CMD_SHUTDOWN.to_be_bytes()).is_ok() {
                    let mut answer = [0u8; 4];
                    let _ = s.read_exact(&mut answer);
                }
            }
        }
        let proc_path = format!("/proc/{}", self.pid);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Path::new(&proc_path).exists() && Instant::now() < deadline {
            // A zombie still has /proc/PID; its state line says Z.
            if std::fs::read_to_string(format!("{proc_path}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if Path::new(&proc_path).exists() {
            // Only this daemon's own pid, never a name-based kill.
            let _ = Command::new("kill").args(["-9", &self.pid.to_string()]).status();
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if self.stop_on_drop {
            self.stop();
        }
    }
}

/// A port P such that P and P+1 are both free on 127.0.0.1 right now.
pub fn free_port_pair() -> Result<u16, AttestError> {
    for _ in 0..64 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(|e| swtpm_err(format!("bind: {e}")))?;
        let port = first.local_addr().map_err(|e| swtpm_err(format!("bind: {e}")))?.port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            return Ok(port);
        }
    }
    Err(swtpm_err("no free port pair on 127.0.0.1"))
}
