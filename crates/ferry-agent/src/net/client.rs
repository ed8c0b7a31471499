//! Opening mTLS connections to agents: the source agent reaches a
//! destination, and the `ferry` CLI reaches an agent's operator API.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ferry_channel::{FrameReader, FrameWriter};
use ferry_identity::PeerAuthenticated;
use ferry_tls::Paced;
use ferry_types::HostName;
use rustls::ClientConfig;
use tokio::net::{TcpSocket, TcpStream};

use super::{Reader, Stream, Writer};
use crate::protocol::{Hello, PROTOCOL_VERSION};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {host} at {addr}")]
    Tcp {
        host: HostName,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {host} at {addr} from this host's migration address {from}")]
    Bind {
        host: HostName,
        addr: SocketAddr,
        from: IpAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to {host} at {addr}")]
    Timeout { host: HostName, addr: SocketAddr },
    #[error("TLS handshake with {host} at {addr} refused: {reason}")]
    Handshake { host: HostName, addr: SocketAddr, reason: String },
    #[error("{host} is not who it claims to be")]
    Identity {
        host: HostName,
        #[source]
        source: ferry_identity::IdentityError,
    },
    #[error("protocol greeting with {host} failed")]
    Hello {
        host: HostName,
        #[source]
        source: ferry_channel::ChannelError,
    },
    #[error("{host} speaks protocol version {theirs}, this agent {ours}")]
    Version { host: HostName, theirs: u32, ours: u32 },
    #[error("cannot take the connection to {host} over from rustls")]
    TakeOver {
        host: HostName,
        #[source]
        source: ferry_tls::TakeOverError,
    },
}

/// TCP connect, TLS 1.3 handshake (mutual: both sides present
/// certificates), a check that the peer's certificate names exactly `host`
/// and this connection's channel binding, in the proof. With `from`, the
/// connection leaves from that address (a peer's migration address);
/// `unsent_limit` bounds its unsent queue ([`super::limit_unsent`]).
pub async fn connect(
    addr: SocketAddr,
    from: Option<IpAddr>,
    unsent_limit: Option<u32>,
    host: &HostName,
    config: Arc<ClientConfig>,
    domain: &ferry_types::TrustDomain,
    timeout: Duration,
) -> Result<(Stream, PeerAuthenticated), ConnectError> {
    let tcp = match tokio::time::timeout(timeout, tcp_connect(addr, from)).await {
        Err(_) => return Err(ConnectError::Timeout { host: host.clone(), addr }),
        Ok(Err(source)) => {
            return Err(match from {
                Some(from) => ConnectError::Bind { host: host.clone(), addr, from, source },
                None => ConnectError::Tcp { host: host.clone(), addr, source },
            })
        }
        Ok(Ok(t)) => t,
    };
    super::limit_unsent(&tcp, unsent_limit);
    handshake(tcp, addr, host, config, domain, timeout).await
}

/// The TLS part of [`connect`], over a TCP connection the caller opened
/// (e.g. from inside another network namespace, as the lab's CLI does).
pub async fn handshake(
    tcp: TcpStream,
    addr: SocketAddr,
    host: &HostName,
    config: Arc<ClientConfig>,
    domain: &ferry_types::TrustDomain,
    timeout: Duration,
) -> Result<(Stream, PeerAuthenticated), ConnectError> {
    let _ = tcp.set_nodelay(true);
    let name = ferry_identity::server_name(host)
        .map_err(|source| ConnectError::Identity { host: host.clone(), source })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = match tokio::time::timeout(timeout, connector.connect(name, Paced::new(tcp))).await {
        Err(_) => return Err(ConnectError::Timeout { host: host.clone(), addr }),
        Ok(Err(e)) => {
            let reason = ferry_identity::describe_tls_error(&e);
            return Err(ConnectError::Handshake { host: host.clone(), addr, reason });
        }
        Ok(Ok(t)) => t,
    };
    // SECURITY: a certificate that chains to our CA is not enough; it must
    // name the host the operator asked for (spoofed destination, threat table).
    let proof = ferry_identity::authenticate_host(tls.get_ref().1, domain, host)
        .map_err(|source| ConnectError::Identity { host: host.clone(), source })?;
    Ok((tokio_rustls::TlsStream::Client(tls), proof))
}

async fn tcp_connect(addr: SocketAddr, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else { return TcpStream::connect(addr).await };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(addr).await
}

/// Hand the connection's records over to ferry-tls (the caller has taken
/// what it needs from the handshake: the proof with its binding), split it
/// into framed halves and exchange protocol greetings.
///
/// A server that refuses our client certificate only says so when we first
/// read (TLS 1.3 sends its alert after the client's Finished), so the alert
/// is decoded here too.
pub async fn greet(
    stream: Stream,
    host: &HostName,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(Reader, Writer), ConnectError> {
    let (r, w) = super::take_over(stream)
        .map_err(|source| ConnectError::TakeOver { host: host.clone(), source })?;
    let mut reader = FrameReader::new(r, timeout);
    let mut writer = FrameWriter::new(w, timeout);
    let hello_err = |source: ferry_channel::ChannelError| match source.io_error() {
        Some(io) if io.get_ref().is_some() => ConnectError::Handshake {
            host: host.clone(),
            addr,
            reason: ferry_identity::describe_tls_error(io),
        },
        _ => ConnectError::Hello { host: host.clone(), source },
    };
    writer.write_control(&Hello { protocol: PROTOCOL_VERSION }).await.map_err(hello_err)?;
    let theirs: Hello = reader.read_control().await.map_err(hello_err)?;
    if theirs.protocol != PROTOCOL_VERSION {
        return Err(ConnectError::Version {
            host: host.clone(),
            theirs: theirs.protocol,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok((reader, writer))
}
