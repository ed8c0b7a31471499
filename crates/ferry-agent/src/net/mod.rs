//! mTLS connections between agents and from operators: [`client`] opens
//! them, [`server`] accepts them; both end in the same framed halves.

pub mod budget;
pub mod client;
pub mod listen;
pub mod plane;

use ferry_channel::{FrameReader, FrameWriter};
use ferry_tls::{Paced, TakeOverError, TcpReader, TcpWriter};
use tokio::net::TcpStream;

pub use client::{connect, greet, handshake, ConnectError};

/// Either end of an agent connection, handshaken. `Paced` keeps rustls from
/// reading past the handshake, so that [`take_over`] can hand the
/// connection's records to ferry-tls (large reads, records opened where
/// they arrive and sealed where the data was read: docs/data-path.md).
pub type Stream = tokio_rustls::TlsStream<Paced<TcpStream>>;
pub type Reader = FrameReader<TcpReader>;
pub type Writer = FrameWriter<TcpWriter>;

/// Hand a handshaken connection's records over to ferry-tls, after the
/// caller read what it needs from rustls (peer identity, channel binding).
///
/// SECURITY: the halves use rustls's own traffic keys and sequence numbers,
/// so every byte stays inside the TLS 1.3 session that was authenticated.
pub fn take_over(stream: Stream) -> Result<(TcpReader, TcpWriter), TakeOverError> {
    match stream {
        tokio_rustls::TlsStream::Client(tls) => {
            let (io, conn) = tls.into_inner();
            ferry_tls::take_over(io, conn)
        }
        tokio_rustls::TlsStream::Server(tls) => {
            let (io, conn) = tls.into_inner();
            ferry_tls::take_over(io, conn)
        }
    }
}
