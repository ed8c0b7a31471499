//! The agent's listeners: the operator API, the peer migration protocol,
//! or one for both (net::plane). Each connection first gets a slot from
//! its listener's budget (net::budget), then TLS 1.3 with client
//! certificates required within a short deadline, then dispatch by who the
//! certificate says the caller is. An unauthenticated caller never reaches
//! a parser beyond the TLS handshake.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_channel::{FrameReader, FrameWriter};
use ferry_identity::{PeerAuthenticated, PeerIdentity};
use ferry_tls::Paced;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::agent::Agent;
use crate::net::budget::{Admission, Budget, Caller, Ticket};
use crate::net::plane::{PeerAddresses, Plane};
use crate::net::{Reader, Writer};
use crate::protocol::{ApiResponse, ErrorKind, Hello, PROTOCOL_VERSION};
use crate::report::report;
use crate::{api, session};

/// Time allowed from accept to the end of the greeting (TLS handshake,
/// certificate checks, Hello). Short: until then the caller is a stranger
/// holding a slot. A peer or operator on a working network needs a few
/// round trips and milliseconds of CPU.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(3);

/// At most one "connection refused" line per second per listener at info
/// level; the rest go to debug. Strangers trigger these, so they must not
/// flood the log (every refusal is counted in /metrics).
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

/// Serve operators and peers on one listener until `shutdown` resolves
/// (the single-address setup).
pub async fn serve(agent: Arc<Agent>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    serve_planes(agent, vec![(Plane::Both, listener)], shutdown).await
}

/// Serve each listener for its plane until `shutdown` resolves.
/// Connections already running finish on their own (a migration in flight
/// is never cut by a shutdown).
pub async fn serve_planes(
    agent: Arc<Agent>,
    listeners: Vec<(Plane, TcpListener)>,
    shutdown: impl Future<Output = ()>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let peers = PeerAddresses::new(agent.cfg.peers.values().map(|a| a.ip()));
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|(plane, listener)| {
            let gate = Arc::new(Gate::new(plane, peers.clone()));
            tokio::spawn(accept_loop(agent.clone(), gate, listener, stopped.clone()))
        })
        .collect();
    shutdown.await;
    tracing::info!("shutting down: no new connections");
    let _ = stop.send(true);
    for l in loops {
        let _ = l.await;
    }
}

/// One listener's admission state.
struct Gate {
    plane: Plane,
    peers: PeerAddresses,
    state: Mutex<GateState>,
    log: LogLimiter,
}

struct GateState {
    budget: Budget,
    /// Woken when the budget evicts that handshake.
    evictions: HashMap<Ticket, Arc<Notify>>,
}

/// A connection's claim on its listener's budget; released on drop.
struct Slot {
    gate: Arc<Gate>,
    ticket: Ticket,
    evicted: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.gate.lock();
        s.budget.release(self.ticket);
        s.evictions.remove(&self.ticket);
    }
}

/// Why a connection was not served: a label for metrics (when it is
/// counted as a connection refusal) and words for the log.
struct Refused {
    label: Option<&'static str>,
    why: String,
}

impl Refused {
    fn tls(why: String) -> Refused {
        Refused { label: None, why }
    }
}

impl Gate {
    fn new(plane: Plane, peers: PeerAddresses) -> Gate {
        Gate {
            plane,
            peers,
            state: Mutex::new(GateState {
                budget: Budget::new(plane.limits()),
                evictions: HashMap::new(),
            }),
            log: LogLimiter::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        // The state is counters only; a panic elsewhere cannot leave it
        // inconsistent in a way that matters more than refusing service.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before any TLS work: the plane's address filter, then the budget.
    fn admit(self: &Arc<Self>, addr: SocketAddr) -> Result<Slot, Refused> {
        self.plane
            .admits_address(addr.ip(), &self.peers)
            .map_err(|r| Refused { label: Some(r.label()), why: r.to_string() })?;
        let mut s = self.lock();
        match s.budget.admit(addr.ip()) {
            Admission::Refused(r) => Err(Refused { label: Some(r.label()), why: r.to_string() }),
            Admission::Admitted { ticket, evicted } => {
                if let Some(old) = evicted.and_then(|t| s.evictions.remove(&t)) {
                    old.notify_one();
                }
                let notify = Arc::new(Notify::new());
                s.evictions.insert(ticket, notify.clone());
                Ok(Slot { gate: self.clone(), ticket, evicted: notify })
            }
        }
    }

    fn refused(&self, agent: &Agent, addr: SocketAddr, r: &Refused) {
        let listener = self.plane.name();
        if let Some(label) = r.label {
            agent.metrics.connection_refused(listener, label);
        }
        if self.log.allow() {
            tracing::info!(%addr, listener, why = %r.why, "connection refused");
        } else {
            tracing::debug!(%addr, listener, why = %r.why, "connection refused");
        }
    }
}

async fn accept_loop(
    agent: Arc<Agent>,
    gate: Arc<Gate>,
    listener: TcpListener,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, addr)) => match gate.admit(addr) {
                    Err(r) => {
                        drop(tcp);
                        gate.refused(&agent, addr, &r);
                    }
                    Ok(slot) => {
                        let (agent, gate) = (agent.clone(), gate.clone());
                        tokio::spawn(async move {
                            if let Err(r) = handle_connection(&agent, slot, tcp).await {
                                gate.refused(&agent, addr, &r);
                            }
                        });
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// A caller that proved who it is and exchanged greetings.
struct Greeted {
    identity: PeerIdentity,
    proof: Option<PeerAuthenticated>,
    reader: Reader,
    writer: Writer,
}

async fn handle_connection(agent: &Arc<Agent>, slot: Slot, tcp: TcpStream) -> Result<(), Refused> {
    let plane = slot.gate.plane;
    if plane != Plane::Api {
        crate::net::limit_unsent(&tcp, agent.cfg.migration.unsent_limit());
    }
    let greeted = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(agent, tcp)) => match r {
            Err(_) => {
                agent.metrics.tls_failure();
                return Err(Refused {
                    label: Some("handshake_deadline"),
                    why: format!("handshake not done within {HANDSHAKE_DEADLINE:?}"),
                });
            }
            Ok(r) => r?,
        },
        _ = slot.evicted.notified() => {
            agent.metrics.tls_failure();
            let r = crate::net::budget::Refusal::Evicted;
            return Err(Refused { label: Some(r.label()), why: r.to_string() });
        }
    };
    let Greeted { identity, proof, reader, mut writer } = greeted;
    let (caller, who) = match &identity {
        PeerIdentity::Operator { name, .. } => (Caller::Operator, format!("operator {name}")),
        PeerIdentity::Host(name) => (Caller::Peer, format!("host {name}")),
    };
    // Refusals after the handshake are told to the caller: it is
    // authenticated, and the reason helps its operator fix the setup.
    let refusal = match plane.admits_caller(caller) {
        Err(r) => Some((r.label(), r.to_string())),
        Ok(()) => slot.gate.lock().budget.authenticated(slot.ticket, caller).err().map(|r| {
            let why = format!("{r} on this agent's {} listener; try again later", plane.name());
            (r.label(), why)
        }),
    };
    if let Some((label, why)) = refusal {
        let denied = ApiResponse::Error { kind: ErrorKind::Denied, message: why.clone() };
        let _ = writer.write_control(&denied).await;
        return Err(Refused { label: Some(label), why: format!("{who}: {why}") });
    }
    match (identity, proof) {
        (PeerIdentity::Operator { name, role }, _) => {
            api::handle(agent.clone(), name, role, reader, writer).await;
            Ok(())
        }
        (PeerIdentity::Host(name), Some(proof)) => {
            if !agent.cfg.peers.contains_key(&name) {
                agent.metrics.refused("unknown_peer");
                let msg = format!("host {name} is not in this agent's [peers] table");
                let denied = ApiResponse::Error { kind: ErrorKind::Denied, message: msg.clone() };
                let _ = writer.write_control(&denied).await;
                return Err(Refused::tls(msg));
            }
            session::destination::handle(agent.clone(), proof, reader, writer).await;
            Ok(())
        }
        (PeerIdentity::Host(_), None) => Err(Refused::tls("host peer without proof".into())),
    }
}

/// TLS, the caller's identity, and the protocol greeting.
async fn handshake(agent: &Agent, tcp: TcpStream) -> Result<Greeted, Refused> {
    let _ = tcp.set_nodelay(true);
    let config = agent.tls.server().map_err(|e| Refused::tls(report(&e)))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = acceptor.accept(Paced::new(tcp)).await.map_err(|e| {
        agent.metrics.tls_failure();
        Refused::tls(format!("TLS handshake failed: {}", ferry_identity::describe_tls_error(&e)))
    })?;
    let identity = ferry_identity::peer_identity(tls.get_ref().1, &agent.domain)
        .map_err(|e| Refused::tls(report(&e)))?;
    // A host peer is authenticated as the host its certificate names, and
    // gets this connection's channel binding with the proof.
    let proof = match &identity {
        PeerIdentity::Host(name) => Some(
            ferry_identity::authenticate_host(tls.get_ref().1, &agent.domain, name)
                .map_err(|e| Refused::tls(report(&e)))?,
        ),
        PeerIdentity::Operator { .. } => None,
    };
    let timeout = agent.cfg.migration.io_timeout();
    let (r, w) = crate::net::take_over(tokio_rustls::TlsStream::Server(tls))
        .map_err(|e| Refused::tls(report(&e)))?;
    let mut reader = FrameReader::new(r, HANDSHAKE_DEADLINE);
    let mut writer = FrameWriter::new(w, timeout);
    let hello: Hello = reader.read_control().await.map_err(|e| Refused::tls(report(&e)))?;
    writer
        .write_control(&Hello { protocol: PROTOCOL_VERSION })
        .await
        .map_err(|e| Refused::tls(report(&e)))?;
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Refused::tls(format!(
            "peer speaks protocol {}, we speak {PROTOCOL_VERSION}",
            hello.protocol
        )));
    }
    reader.set_timeout(timeout);
    Ok(Greeted { identity, proof, reader, writer })
}
