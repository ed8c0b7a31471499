//! Two agents, host1 and host2, in this process: a CA and certificates,
//! the shipped example policy, audit logs and records in a temporary
//! directory, fake VMs and TPMs. host1 reaches host2 through a [`Proxy`].

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use ferry_identity::{CaDir, Identity, TlsConfigs, Validity};
use ferry_types::{HostName, TrustDomain, VmName};
use ferry_vmm::VmSpec;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::platform::FakeTpm;
use super::proxy::Proxy;
use crate::agent::Agent;
use crate::backend::fake::FakeBackend;
use crate::config::AgentConfig;
use crate::notary::Notary;
use crate::plan::TransferPlan;
use crate::session::source::{self, Finished, Requester};
use crate::startup::Parts;

const POLICY: &str = include_str!("../../../../docs/policy/ferry.cedar");

pub struct Host {
    pub name: HostName,
    pub agent: Arc<Agent>,
    pub backend: FakeBackend,
    pub tampered: Arc<std::sync::atomic::AtomicBool>,
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    config: String,
}

pub struct Lab {
    pub dir: tempfile::TempDir,
    pub hosts: Vec<Host>,
    /// Between host1 (the source) and host2.
    pub link: Proxy,
}

fn host(n: u8) -> HostName {
    format!("host{n}").parse().expect("host name")
}

pub fn vm(name: &str) -> VmName {
    name.parse().expect("vm name")
}

pub fn spec(name: &str) -> VmSpec {
    serde_json::from_value(serde_json::json!({
        "name": name, "memory_mib": 64, "vcpus": 1, "machine": "q35",
        "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": ""},
    }))
    .expect("spec")
}

impl Lab {
    /// Two hosts; `extra` is appended to both agents' config.
    pub async fn new(extra: &str) -> Lab {
        Self::with(extra, extra).await
    }

    /// Two hosts with their own extra config.
    pub async fn with(extra1: &str, extra2: &str) -> Lab {
        let dir = tempfile::tempdir().expect("tempdir");
        let domain: TrustDomain = "ferry.test".parse().expect("domain");
        let ca = CaDir::init(&dir.path().join("ca"), &domain, 30).expect("CA");
        let policy = dir.path().join("policy");
        std::fs::create_dir_all(&policy).expect("policy dir");
        std::fs::write(policy.join("ferry.cedar"), POLICY).expect("policy");
        let entities = serde_json::json!([
            { "uid": { "type": "Host", "id": "host1" }, "attrs": { "zone": "lab", "trust_level": 3 }, "parents": [] },
            { "uid": { "type": "Host", "id": "host2" }, "attrs": { "zone": "lab", "trust_level": 3 }, "parents": [] },
            { "uid": { "type": "Operator", "id": "admin" }, "attrs": { "roles": ["admin", "operator"], "tenants": ["default"] }, "parents": [] },
        ]);
        std::fs::write(policy.join("entities.json"), entities.to_string()).expect("entities");
        let listeners = [
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
            TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        ];
        let addrs: Vec<SocketAddr> =
            listeners.iter().map(|l| l.local_addr().expect("addr")).collect();
        let link = Proxy::start(addrs[1]).await;
        let mut hosts = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let name = host(i as u8 + 1);
            let certs = dir.path().join(name.as_str());
            let issued = ca.issue_host(&name, Validity::days(30), &certs).expect("host cert");
            let peer = if i == 0 { ("host2", link.addr) } else { ("host1", addrs[0]) };
            let extra = if i == 0 { extra1 } else { extra2 };
            let config = format!(
                "[host]\nname = \"{name}\"\nlisten = \"{listen}\"\nstate_dir = \"{state}\"\n\
                 [tls]\ncert = \"{cert}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\
                 [attestation]\ninsecure_disabled = true\n\
                 [policy]\nfiles = [\"{policy}/ferry.cedar\"]\nentities = \"{policy}/entities.json\"\n\
                 [peers]\n{peer} = \"{peer_addr}\"\n\
                 [migration]\nio_timeout_ms = 3000\ncommit_timeout_ms = 2000\nresolve_retry_ms = 100\n\
                 resolve_wait_ms = 5000\nmax_transfer_ms = 20000\n{extra}",
                listen = addrs[i],
                state = dir.path().join(format!("{name}-state")).display(),
                cert = issued.cert.display(),
                key = issued.key.display(),
                ca = ca.cert_path().display(),
                policy = policy.display(),
                peer = peer.0,
                peer_addr = peer.1,
            );
            let backend = FakeBackend::default();
            let tpm = FakeTpm::new(name.clone());
            let tampered = tpm.tampered.clone();
            let mut h = Host {
                name,
                agent: Self::assemble(&config, backend.clone(), tpm).await,
                backend,
                tampered,
                addr: addrs[i],
                stop: None,
                config,
            };
            h.serve(listener);
            hosts.push(h);
        }
        Lab { dir, hosts, link }
    }

    async fn assemble(config: &str, backend: FakeBackend, tpm: FakeTpm) -> Arc<Agent> {
        let cfg = AgentConfig::parse(config, Path::new("lab.toml")).expect("config");
        let identity =
            Identity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca, None).expect("identity");
        let domain = identity.domain().clone();
        let tls = TlsConfigs::new(identity).expect("TLS");
        let signer = ferry_audit::Signer::load(&cfg.tls.cert, &cfg.tls.key).expect("signer");
        std::fs::create_dir_all(&cfg.host.state_dir).expect("state dir");
        let log = ferry_audit::AuditLog::open(&cfg.audit_log_path(), signer).expect("audit log");
        let ca = ferry_audit::CaTrust::load(&cfg.tls.ca).expect("CA trust");
        let parts = Parts {
            cfg,
            tls,
            backend: Box::new(backend),
            platform: Some(Box::new(tpm)),
            notary: Notary::new(domain, log, ca),
        };
        Agent::assemble(parts).await.expect("agent")
    }

    pub fn host(&self, n: usize) -> &Host {
        &self.hosts[n - 1]
    }

    /// Migrate `vm` from host1 to host2 as the lab's admin, to the end.
    pub async fn migrate(&self, name: &str) -> Result<Finished, crate::error::Error> {
        self.migrate_with(name, TransferPlan::new(1, false).expect("plan")).await
    }

    pub async fn migrate_with(
        &self,
        name: &str,
        plan: TransferPlan,
    ) -> Result<Finished, crate::error::Error> {
        let agent = self.host(1).agent.clone();
        let operator = "admin".parse().expect("operator");
        let who = Requester { operator: &operator, role: "admin" };
        let (_, _, done) = source::start(agent, vm(name), host(2), who, plan).await?;
        Ok(done.await.expect("migration task"))
    }

    /// Stop host `n`'s agent (its VMs live on in its backend) and start a
    /// new one on the same state, as after a crash.
    pub async fn restart(&mut self, n: usize) {
        let h = &mut self.hosts[n - 1];
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(());
        }
        h.agent.stop();
        let listener = loop {
            match TcpListener::bind(h.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        let tpm = FakeTpm::new(h.name.clone());
        h.tampered = tpm.tampered.clone();
        h.agent = Self::assemble(&h.config, h.backend.clone(), tpm).await;
        h.serve(listener);
    }
}

impl Host {
    fn serve(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        self.stop = Some(tx);
        let agent = self.agent.clone();
        tokio::spawn(crate::server::serve(agent, listener, async move {
            let _ = rx.await;
        }));
    }
}
