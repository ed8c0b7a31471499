//! The operator's side of the agent API: credentials and agent addresses
//! from a client config file, one mTLS connection per request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_agent::protocol::{ApiRequest, ApiResponse, Progress};
use ferry_identity::Identity;
use ferry_types::{HostName, TrustDomain};
use serde::{Deserialize, Serialize};

/// `client.toml`: who the operator is and where the agents are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub crl: Option<PathBuf>,
    /// The agent to talk to when --host is not given.
    pub default_host: Option<HostName>,
    pub agents: BTreeMap<HostName, SocketAddr>,
    /// Connect from inside this network namespace (a lab made with
    /// `--netns`: its operator namespace, on the management network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

pub struct OpClient {
    pub cfg: ClientConfig,
    tls: Arc<rustls::ClientConfig>,
    domain: TrustDomain,
}

/// Requests other than migrate answer quickly; migrate streams progress.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

impl OpClient {
    pub fn load(path: &Path) -> Result<Self> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("cannot read client config {}", path.display()))?
            .len();
        if len > ferry_agent::config::MAX_CONFIG_FILE {
            bail!("client config {} is {len} bytes; refusing to read it", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read client config {}", path.display()))?;
        let mut cfg: ClientConfig = toml::from_str(&text)
            .with_context(|| format!("client config {} is invalid", path.display()))?;
        // Relative paths are relative to the file, so the operator's
        // directory works wherever it is copied.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut cfg.cert, &mut cfg.key, &mut cfg.ca].into_iter().chain(cfg.crl.as_mut()) {
            *p = base.join(&*p);
        }
        let id = Identity::load(&cfg.cert, &cfg.key, &cfg.ca, cfg.crl.as_deref()).with_context(
            || format!("cannot load the operator identity named in {}", path.display()),
        )?;
        let domain = id.domain().clone();
        let tls = ferry_identity::client_config(&id)?;
        Ok(Self { cfg, tls, domain })
    }

    pub fn host(&self, host: Option<&HostName>) -> Result<HostName> {
        host.or(self.cfg.default_host.as_ref())
            .cloned()
            .ok_or_else(|| anyhow!("no --host given and the client config has no default_host"))
    }

    /// Send one request; progress messages go to `on_progress`; the final
    /// response is returned (an `Error` response too, for the caller to map).
    pub async fn request(
        &self,
        host: &HostName,
        req: &ApiRequest,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<ApiResponse> {
        let addr =
            *self.cfg.agents.get(host).ok_or_else(|| {
                anyhow!("host {host} is not in the client config's [agents] table")
            })?;
        let timeout = Duration::from_secs(10);
        let connected = match &self.cfg.netns {
            None => {
                ferry_agent::net::connect(
                    addr,
                    None,
                    None,
                    host,
                    self.tls.clone(),
                    &self.domain,
                    timeout,
                )
                .await
            }
            Some(ns) => {
                let ns = ns.clone();
                let tcp = tokio::task::spawn_blocking(move || {
                    crate::lab_netns::connect(&ns, addr, timeout)
                })
                .await??;
                tcp.set_nonblocking(true)?;
                let tcp = tokio::net::TcpStream::from_std(tcp)?;
                ferry_agent::net::handshake(
                    tcp,
                    addr,
                    host,
                    self.tls.clone(),
                    &self.domain,
                    timeout,
                )
                .await
            }
        };
        let (stream, _proof) = connected.map_err(|e| anyhow!(ferry_agent::report(&e)))?;
        let (mut reader, mut writer) = ferry_agent::net::greet(stream, host, addr, REQUEST_TIMEOUT)
            .await
            .map_err(|e| anyhow!(ferry_agent::report(&e)))?;
        writer
            .write_control(req)
            .await
            .map_err(|e| anyhow!("sending the request to {host}: {}", ferry_agent::report(&e)))?;
        loop {
            let resp: ApiResponse = reader.read_control().await.map_err(|e| {
                anyhow!("reading the answer from {host}: {}", ferry_agent::report(&e))
            })?;
            match resp {
                ApiResponse::Progress(p) => on_progress(&p),
                other => return Ok(other),
            }
        }
    }

    /// A request whose `Error` answer becomes an `Err`.
    pub async fn call(&self, host: &HostName, req: &ApiRequest) -> Result<ApiResponse> {
        match self.request(host, req, |_| {}).await? {
            ApiResponse::Error { kind, message } => bail!("{host} refused ({kind:?}): {message}"),
            other => Ok(other),
        }
    }
}
