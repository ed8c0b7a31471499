//! The agent's one listener: TLS 1.3 with client certificates required, then
//! dispatch by who the certificate says the peer is. An unauthenticated
//! peer never reaches a parser beyond the TLS handshake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferry_channel::{FrameReader, FrameWriter};
use ferry_identity::PeerIdentity;
use ferry_tls::Paced;
use tokio::net::{TcpListener, TcpStream};

use crate::agent::Agent;
use crate::protocol::{ApiResponse, ErrorKind, Hello, PROTOCOL_VERSION};
use crate::report::report;
use crate::{api, session};

/// Connections (handshaking or established) served at once.
pub const MAX_CONNECTIONS: usize = 512;

/// At most one "connection refused" line per second at info level; the
/// rest go to debug. Peers can trigger these, so they must not flood logs.
#[derive(Default)]
struct LogLimiter {
    last_second: std::sync::atomic::AtomicU64,
}

impl LogLimiter {
    fn allow(&self) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.last_second.swap(now, std::sync::atomic::Ordering::Relaxed) != now
    }
}

/// Time allowed for a TLS handshake and the greeting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve until `shutdown` resolves. Connections already running finish on
/// their own (a migration in flight is never cut by a shutdown).
pub async fn serve(agent: Arc<Agent>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let limiter = Arc::new(LogLimiter::default());
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutting down: no new connections");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => {
                    // Bound the connections in flight: a flood of peers
                    // cannot exhaust memory or tasks, and each refusal is
                    // logged at most once per second (counted in /metrics).
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        agent.metrics.refused("connection_limit");
                        drop(tcp);
                        continue;
                    };
                    let agent = agent.clone();
                    let limiter = limiter.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(why) = handle_connection(agent, tcp).await {
                            if limiter.allow() {
                                tracing::info!(%addr, %why, "connection refused");
                            } else {
                                tracing::debug!(%addr, %why, "connection refused");
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn handle_connection(agent: Arc<Agent>, tcp: TcpStream) -> Result<(), String> {
    let _ = tcp.set_nodelay(true);
    let config = agent.tls.server().map_err(|e| report(&e))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(Paced::new(tcp))).await
    {
        Err(_) => {
            agent.metrics.tls_failure();
            return Err("TLS handshake timed out".into());
        }
        Ok(Err(e)) => {
            agent.metrics.tls_failure();
            return Err(format!(
                "TLS handshake failed: {}",
                ferry_identity::describe_tls_error(&e)
            ));
        }
        Ok(Ok(t)) => t,
    };
    let identity =
        ferry_identity::peer_identity(tls.get_ref().1, &agent.domain).map_err(|e| report(&e))?;
    // A host peer is authenticated as the host its certificate names, and
    // gets this connection's channel binding with the proof.
    let proof = match &identity {
        PeerIdentity::Host(name) => Some(
            ferry_identity::authenticate_host(tls.get_ref().1, &agent.domain, name)
                .map_err(|e| report(&e))?,
        ),
        PeerIdentity::Operator { .. } => None,
    };
    let timeout = agent.cfg.migration.io_timeout();
    let (r, w) =
        crate::net::take_over(tokio_rustls::TlsStream::Server(tls)).map_err(|e| report(&e))?;
    let mut reader = FrameReader::new(r, HANDSHAKE_TIMEOUT);
    let mut writer = FrameWriter::new(w, timeout);
    let hello: Hello = reader.read_control().await.map_err(|e| report(&e))?;
    writer.write_control(&Hello { protocol: PROTOCOL_VERSION }).await.map_err(|e| report(&e))?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(format!(
            "peer speaks protocol {}, we speak {PROTOCOL_VERSION}",
            hello.protocol
        ));
    }
    reader.set_timeout(timeout);
    match (identity, proof) {
        (PeerIdentity::Operator { name, role }, _) => {
            api::handle(agent, name, role, reader, writer).await;
            Ok(())
        }
        (PeerIdentity::Host(name), Some(proof)) => {
            if !agent.cfg.peers.contains_key(&name) {
                agent.metrics.refused("unknown_peer");
                let msg = format!("host {name} is not in this agent's [peers] table");
                let denied = ApiResponse::Error { kind: ErrorKind::Denied, message: msg.clone() };
                let _ = writer.write_control(&denied).await;
                return Err(msg);
            }
            session::destination::handle(agent, proof, reader, writer).await;
            Ok(())
        }
        (PeerIdentity::Host(_), None) => Err("host peer without proof".into()),
    }
}
