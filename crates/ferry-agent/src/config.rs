//! The agent's configuration file (TOML). Parsed once in `main`, typed, and
//! passed down; unknown keys are refused so a typo cannot silently weaken a
//! setting. `docs/agent.sample.toml` is the commented sample.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_types::HostName;
use ferry_vmm::AccelChoice;
use serde::Deserialize;

use crate::net::listen::ListenOn;

/// Largest config file read.
pub const MAX_CONFIG_FILE: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path:?} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path:?}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub host: HostSection,
    /// The operator API listener (default: `[host] listen`).
    #[serde(default)]
    pub api: ApiSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub qemu: QemuSection,
    #[serde(default)]
    pub vmm: VmmSection,
    #[serde(default)]
    pub migration: MigrationSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    /// TPM platform attestation (R1). Required unless explicitly disabled.
    pub attestation: AttestationSection,
    #[serde(default)]
    pub audit: AuditSection,
    /// Cedar policies (R3): required, default deny.
    pub policy: PolicySection,
    /// What this host accepts as a destination.
    #[serde(default)]
    pub admission: ferry_policy::AdmissionConfig,
    /// Peer agents by host name: their migration listeners. A migration may
    /// only target a host listed here, and the peer must prove that name.
    /// With a migration listener of its own, this host accepts peer
    /// connections only from these addresses.
    #[serde(default)]
    pub peers: BTreeMap<HostName, SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationSection {
    /// TCTI of this host's TPM: "device:/dev/tpmrm0" in production,
    /// "swtpm:host=127.0.0.1,port=P" for a software TPM (tests, lab).
    pub tcti: Option<String>,
    /// This host's enrolled attestation key (`ferry attest enroll`).
    pub ak: Option<PathBuf>,
    /// Directory of enrolled AKs, one file per host: only these are trusted.
    pub registry: Option<PathBuf>,
    /// Reference PCR values per host class.
    pub reference_values: Option<PathBuf>,
    /// INSECURE: neither quote nor require quotes. Warned at start-up and
    /// recorded on every migration this host takes part in.
    #[serde(default)]
    pub insecure_disabled: bool,
}

/// Where attestation material lives, once checked to be complete.
#[derive(Debug, Clone)]
pub struct AttestationPaths {
    pub tcti: String,
    pub ak: PathBuf,
    pub registry: PathBuf,
    pub reference_values: PathBuf,
}

impl AttestationSection {
    /// None when attestation is (insecurely) disabled.
    pub fn paths(&self, path: &Path) -> Result<Option<AttestationPaths>, ConfigError> {
        if self.insecure_disabled {
            return Ok(None);
        }
        let missing = |k: &str| {
            ConfigError::Invalid {
            path: path.to_owned(),
            message: format!("[attestation] {k} is required (or set insecure_disabled = true, which is insecure)"),
        }
        };
        Ok(Some(AttestationPaths {
            tcti: self.tcti.clone().ok_or_else(|| missing("tcti"))?,
            ak: self.ak.clone().ok_or_else(|| missing("ak"))?,
            registry: self.registry.clone().ok_or_else(|| missing("registry"))?,
            reference_values: self
                .reference_values
                .clone()
                .ok_or_else(|| missing("reference_values"))?,
        }))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Cedar policy files, validated against Ferry's schema at load and reload.
    pub files: Vec<PathBuf>,
    /// Hosts (zone, trust level) and operators (roles, tenants).
    pub entities: PathBuf,
}

/// The signed, hash-chained audit log.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// Default: `<state_dir>/audit.log`.
    pub log: Option<PathBuf>,
}

/// The operator API: where `ferry` clients connect.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    pub listen: Option<SocketAddr>,
}

/// Where this agent listens, once the config is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planes {
    pub api: SocketAddr,
    pub migration: ListenOn,
}

/// Prometheus metrics over plain HTTP; off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// This host's name; must equal the name in its certificate.
    pub name: HostName,
    /// Address of the operator API and the peer protocol (both mTLS), for
    /// whichever of `[api] listen` and `[migration] listen` is not set.
    pub listen: Option<SocketAddr>,
    /// VM directories, migration records and the console logs live here.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// Certificate revocation list from the cluster CA; re-read when it changes.
    pub crl: Option<PathBuf>,
    /// TLS 1.3 cipher suites offered and accepted, most preferred first
    /// (`ferry_identity::CipherPolicy`; docs/data-path.md says why
    /// AES-128-GCM comes first).
    #[serde(default = "default_cipher_suites")]
    pub cipher_suites: Vec<String>,
}

fn default_cipher_suites() -> Vec<String> {
    ferry_identity::CipherPolicy::default().suites().iter().map(|s| s.name().to_owned()).collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    pub binary: PathBuf,
    /// swtpm, which gives VMs started with a vTPM their own TPM 2.0.
    pub swtpm: PathBuf,
    pub accel: AccelChoice,
    /// Kernel and disk images that VM specs may name; nothing outside it.
    pub images_dir: PathBuf,
    /// QEMU's migration bandwidth cap in MiB/s; 0 means as fast as possible
    /// (QEMU 7.2's own default is 32 MiB/s, which makes every migration crawl).
    pub max_bandwidth_mib_s: u64,
    pub downtime_limit_ms: u64,
}

impl Default for QemuSection {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("qemu-system-x86_64"),
            swtpm: PathBuf::from("swtpm"),
            accel: AccelChoice::Auto,
            images_dir: PathBuf::from("/var/lib/ferry/images"),
            max_bandwidth_mib_s: 0,
            downtime_limit_ms: 300,
        }
    }
}

/// Who runs this host's VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// QEMUs this agent launches (`ferry vm start`).
    #[default]
    Qemu,
    /// libvirt's domains; libvirt runs their migrations, Ferry carries them.
    Libvirt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmmSection {
    pub backend: BackendChoice,
    pub libvirt_uri: String,
    /// libvirt's run directory: its `libvirt-sock`, where a destination's
    /// migration control connection goes, and `qemu/NAME.pid`.
    pub libvirt_run_dir: PathBuf,
    /// Where a migration's local sockets live (a directory per migration,
    /// mode 0700). The same path on every host: libvirt hands the source's
    /// path to the destination.
    pub migration_socket_dir: PathBuf,
    /// Where libvirt keeps its domains' swtpm state (libvirt's
    /// `swtpm_storage_dir`): a moved domain's state is erased there.
    pub libvirt_swtpm_dir: PathBuf,
}

impl Default for VmmSection {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Qemu,
            libvirt_uri: "qemu:///system".into(),
            libvirt_run_dir: PathBuf::from("/run/libvirt"),
            migration_socket_dir: PathBuf::from("/run/ferry"),
            libvirt_swtpm_dir: PathBuf::from(ferry_libvirt::vtpm::DEFAULT_STATE_ROOT),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationSection {
    /// The peer migration listener, an address or INTERFACE:PORT (default:
    /// `[host] listen`). Connections to peers leave from its address.
    pub listen: Option<ListenOn>,
    pub connect_timeout_ms: u64,
    /// Longest silence tolerated on a migration connection.
    pub io_timeout_ms: u64,
    /// How long a destination waits for its QEMU to finish loading after commit.
    pub commit_timeout_ms: u64,
    /// How long an offer stays valid after its id was made.
    pub offer_validity_ms: u64,
    /// Operator roles (from the certificate) allowed to start, stop and migrate VMs.
    pub operator_roles: Vec<String>,
    /// Outgoing migrations allowed per destination per window (C4).
    pub outgoing_max: u32,
    pub outgoing_window_ms: u64,
    /// Longest transfer before a migration that does not converge is
    /// aborted and the VM resumes on the source.
    pub max_transfer_ms: u64,
    /// Data streams per migration: 1, or 1 + QEMU multifd channels (≤ 8).
    pub streams: crate::plan::Streams,
    /// First retry of an interrupted post-copy, doubling up to
    /// [`MAX_POSTCOPY_RECOVER_RETRY_MS`]; 0 leaves recovery to the operator.
    pub postcopy_recover_retry_ms: u64,
    /// First retry of asking the destination about a migration in doubt;
    /// the wait doubles up to a minute. 0: only `ferry migrations resolve`.
    pub resolve_retry_ms: u64,
    /// How long `ferry migrate` waits for a migration in doubt to settle
    /// before it answers "in doubt" (exit status 4).
    pub resolve_wait_ms: u64,
    /// Most bytes (KiB) a peer connection keeps queued unsent in the
    /// kernel (TCP_NOTSENT_LOWAT); 0 leaves the kernel's (up to 4 MiB).
    pub unsent_limit_kib: u32,
}

/// Highest `unsent_limit_kib`: 64 MiB, more than any link needs queued.
pub const MAX_UNSENT_LIMIT_KIB: u32 = 64 * 1024;

/// Longest pause between automatic post-copy recovery attempts.
pub const MAX_POSTCOPY_RECOVER_RETRY_MS: u64 = 60_000;

impl Default for MigrationSection {
    fn default() -> Self {
        Self {
            listen: None,
            connect_timeout_ms: 5_000,
            io_timeout_ms: 15_000,
            commit_timeout_ms: 60_000,
            offer_validity_ms: 60_000,
            operator_roles: vec!["admin".into(), "operator".into()],
            outgoing_max: 30,
            outgoing_window_ms: 60_000,
            max_transfer_ms: 600_000,
            streams: crate::plan::Streams::ONE,
            postcopy_recover_retry_ms: 5_000,
            resolve_retry_ms: 1_000,
            resolve_wait_ms: 15_000,
            unsent_limit_kib: 128,
        }
    }
}

impl MigrationSection {
    pub fn io_timeout(&self) -> Duration {
        Duration::from_millis(self.io_timeout_ms)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn max_transfer(&self) -> Duration {
        Duration::from_millis(self.max_transfer_ms)
    }
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
    /// None when automatic resolution is off.
    pub fn resolve_retry(&self) -> Option<Duration> {
        (self.resolve_retry_ms > 0).then(|| Duration::from_millis(self.resolve_retry_ms))
    }
    pub fn resolve_wait(&self) -> Duration {
        Duration::from_millis(self.resolve_wait_ms)
    }
    /// The unsent-queue limit in bytes; None: the kernel's own.
    pub fn unsent_limit(&self) -> Option<u32> {
        (self.unsent_limit_kib > 0).then(|| self.unsent_limit_kib.saturating_mul(1024))
    }
    /// None when automatic post-copy recovery is off.
    pub fn postcopy_recover_retry(&self) -> Option<Duration> {
        (self.postcopy_recover_retry_ms > 0)
            .then(|| Duration::from_millis(self.postcopy_recover_retry_ms))
    }
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let len = std::fs::metadata(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?
            .len();
        if len > MAX_CONFIG_FILE {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: format!("{len} bytes; a config is at most {MAX_CONFIG_FILE}"),
            });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: AgentConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let invalid = |message: String| ConfigError::Invalid { path: path.to_owned(), message };
        if cfg.peers.contains_key(&cfg.host.name) {
            return Err(invalid(format!("[peers] lists this host ({}) itself", cfg.host.name)));
        }
        if cfg.migration.io_timeout_ms == 0 || cfg.migration.connect_timeout_ms == 0 {
            return Err(invalid("[migration] timeouts must be greater than 0".into()));
        }
        cfg.attestation.paths(path)?;
        cfg.planes(path)?;
        ferry_identity::CipherPolicy::from_names(&cfg.tls.cipher_suites)
            .map_err(|e| invalid(format!("[tls] cipher_suites: {e}")))?;
        if cfg.migration.resolve_retry_ms > MAX_POSTCOPY_RECOVER_RETRY_MS {
            return Err(invalid(format!(
                "[migration] resolve_retry_ms must be at most {MAX_POSTCOPY_RECOVER_RETRY_MS} (0 leaves resolution to the operator)"
            )));
        }
        if cfg.migration.postcopy_recover_retry_ms > MAX_POSTCOPY_RECOVER_RETRY_MS {
            return Err(invalid(format!(
                "[migration] postcopy_recover_retry_ms must be at most {MAX_POSTCOPY_RECOVER_RETRY_MS} (0 turns automatic recovery off)"
            )));
        }
        if cfg.migration.unsent_limit_kib > MAX_UNSENT_LIMIT_KIB {
            return Err(invalid(format!(
                "[migration] unsent_limit_kib must be at most {MAX_UNSENT_LIMIT_KIB} (0 leaves the kernel's limit)"
            )));
        }
        Ok(cfg)
    }

    /// The API and migration listeners' addresses (the same address for
    /// a single-address setup).
    pub fn planes(&self, path: &Path) -> Result<Planes, ConfigError> {
        let missing = |which: &str| ConfigError::Invalid {
            path: path.to_owned(),
            message: format!("[{which}] listen or [host] listen is required"),
        };
        let api = self.api.listen.or(self.host.listen).ok_or_else(|| missing("api"))?;
        let migration = match (&self.migration.listen, self.host.listen) {
            (Some(m), _) => m.clone(),
            (None, Some(h)) => ListenOn::Address(h),
            (None, None) => return Err(missing("migration")),
        };
        Ok(Planes { api, migration })
    }

    /// The address this host's connections to peers leave from: its
    /// migration address, so that peers see the address their `[peers]`
    /// table names. None (the system picks) without a `[migration] listen`
    /// or when that listener binds every address.
    pub fn migration_source(&self) -> Result<Option<IpAddr>, crate::net::listen::ListenError> {
        let Some(listen) = &self.migration.listen else { return Ok(None) };
        let ip = listen.resolve()?.ip();
        Ok((!ip.is_unspecified()).then_some(ip))
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.host.state_dir.join("vms")
    }
    pub fn records_dir(&self) -> PathBuf {
        self.host.state_dir.join("migrations")
    }
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit.log.clone().unwrap_or_else(|| self.host.state_dir.join("audit.log"))
    }
    pub fn departed_dir(&self) -> PathBuf {
        self.host.state_dir.join("departed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [host]
        name = "host1"
        listen = "127.0.0.1:7101"
        state_dir = "/tmp/ferry"
        [tls]
        cert = "h.pem"
        key = "h.key"
        ca = "ca.pem"
        [attestation]
        tcti = "swtpm:host=127.0.0.1,port=2321"
        ak = "ak.json"
        registry = "aks"
        reference_values = "refs.toml"
        [policy]
        files = ["ferry.cedar"]
        entities = "entities.json"
        [peers]
        host2 = "127.0.0.1:7102"
    "#;

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        assert_eq!(c.host.name.as_str(), "host1");
        assert_eq!(c.qemu.accel, AccelChoice::Auto);
        assert_eq!(c.migration.operator_roles, ["admin", "operator"]);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.tls.cipher_suites[0], "TLS_AES_128_GCM_SHA256");
        assert_eq!(c.migration.unsent_limit(), Some(128 * 1024));
    }

    #[test]
    fn cipher_suites_are_checked_when_the_config_is_read() {
        let only_256 = MINIMAL.replace(
            "ca = \"ca.pem\"",
            "ca = \"ca.pem\"\ncipher_suites = [\"TLS_AES_256_GCM_SHA384\"]",
        );
        let c = AgentConfig::parse(&only_256, Path::new("a.toml")).unwrap();
        assert_eq!(c.tls.cipher_suites, ["TLS_AES_256_GCM_SHA384"]);
        for bad in ["[]", "[\"TLS_AES_128_CCM_SHA256\"]"] {
            let cfg = MINIMAL
                .replace("ca = \"ca.pem\"", &format!("ca = \"ca.pem\"\ncipher_suites = {bad}"));
            let e = AgentConfig::parse(&cfg, Path::new("a.toml")).unwrap_err().to_string();
            assert!(e.contains("[tls] cipher_suites"), "{bad}: {e}");
        }
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let typo = MINIMAL.replace("state_dir", "statedir");
        let e = AgentConfig::parse(&typo, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("a.toml") && e.contains("statedir"), "{e}");
        let bad_name = MINIMAL.replace("host2 =", "Host_2 =");
        let e = AgentConfig::parse(&bad_name, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("host name"), "{e}");
        let self_peer = MINIMAL.replace("host2 =", "host1 =");
        let e = AgentConfig::parse(&self_peer, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("itself"), "{e}");
        let no_ak = MINIMAL.replace("ak = \"ak.json\"", "");
        let e = AgentConfig::parse(&no_ak, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("[attestation] ak is required"), "{e}");
        let slow_retry = format!("{MINIMAL}\n[migration]\npostcopy_recover_retry_ms = 3600000\n");
        let e = AgentConfig::parse(&slow_retry, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("postcopy_recover_retry_ms must be at most 60000"), "{e}");
        let off = format!("{MINIMAL}\n[migration]\npostcopy_recover_retry_ms = 0\n");
        assert_eq!(
            AgentConfig::parse(&off, Path::new("a.toml"))
                .unwrap()
                .migration
                .postcopy_recover_retry(),
            None
        );
        let huge = format!("{MINIMAL}\n[migration]\nunsent_limit_kib = 4194304\n");
        let e = AgentConfig::parse(&huge, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("unsent_limit_kib must be at most 65536"), "{e}");
        let kernels = format!("{MINIMAL}\n[migration]\nunsent_limit_kib = 0\n");
        let c = AgentConfig::parse(&kernels, Path::new("a.toml")).unwrap();
        assert_eq!(c.migration.unsent_limit(), None);
    }

    #[test]
    fn one_address_serves_both_planes_unless_they_are_split() {
        let one = AgentConfig::parse(MINIMAL, Path::new("a.toml")).unwrap();
        let p = one.planes(Path::new("a.toml")).unwrap();
        assert_eq!(p.api, "127.0.0.1:7101".parse().unwrap());
        assert_eq!(p.migration, ListenOn::Address(p.api));
        // Today's behaviour: connections to peers leave from wherever the system picks.
        assert_eq!(one.migration_source(), Ok(None));

        let split = MINIMAL.replace(
            "[tls]",
            "[api]\nlisten = \"10.0.0.1:7100\"\n[migration]\nlisten = \"127.0.0.5:7101\"\n[tls]",
        );
        let split = split.replace("listen = \"127.0.0.1:7101\"\n", "");
        let c = AgentConfig::parse(&split, Path::new("a.toml")).unwrap();
        let p = c.planes(Path::new("a.toml")).unwrap();
        assert_eq!(p.api, "10.0.0.1:7100".parse().unwrap());
        assert_eq!(p.migration, ListenOn::Address("127.0.0.5:7101".parse().unwrap()));
        assert_eq!(c.migration_source(), Ok(Some("127.0.0.5".parse().unwrap())));

        let by_interface = split.replace("127.0.0.5:7101", "lo:7101");
        let c = AgentConfig::parse(&by_interface, Path::new("a.toml")).unwrap();
        assert!(c.migration_source().unwrap().is_some_and(|ip| ip.is_loopback()));

        let any = split.replace("127.0.0.5:7101", "0.0.0.0:7101");
        let c = AgentConfig::parse(&any, Path::new("a.toml")).unwrap();
        assert_eq!(c.migration_source(), Ok(None));

        let no_api = split.replace("[api]\nlisten = \"10.0.0.1:7100\"\n", "");
        let e = AgentConfig::parse(&no_api, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("[api] listen or [host] listen is required"), "{e}");
        let bad = split.replace("127.0.0.5:7101", "eth 0:7101");
        let e = AgentConfig::parse(&bad, Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("not an interface name"), "{e}");
    }

    /// The commented sample in docs/ must stay a valid, complete config.
    #[test]
    fn the_sample_config_parses() {
        let text = include_str!("../../../docs/agent.sample.toml");
        let c = AgentConfig::parse(text, Path::new("docs/agent.sample.toml")).unwrap();
        assert_eq!(c.host.name.as_str(), "host1");
        assert!(c.tls.crl.is_some());
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.migration.postcopy_recover_retry(), Some(Duration::from_secs(5)));
    }
}
