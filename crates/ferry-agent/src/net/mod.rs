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

/// Keep at most `bytes` queued unsent in this connection's kernel send
/// buffer (TCP_NOTSENT_LOWAT; None: the kernel's own limit, up to 4 MiB).
/// What is still queued when the guest stops must cross the link before
/// the destination can resume it, per stream: a short queue leaves the
/// rest in QEMU, which then also sees the link's real rate (docs/data-path.md).
pub fn limit_unsent(tcp: &TcpStream, bytes: Option<u32>) {
    let Some(bytes) = bytes else { return };
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(bytes) {
        tracing::warn!(error = %e, "cannot limit the connection's unsent queue (TCP_NOTSENT_LOWAT)");
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_unsent_limit_is_set_on_the_socket_and_none_leaves_the_kernels() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limited = TcpStream::connect(addr).await.unwrap();
        limit_unsent(&limited, Some(128 * 1024));
        let lowat = socket2::SockRef::from(&limited).tcp_notsent_lowat().unwrap();
        assert_eq!(lowat, 128 * 1024);
        let kernels = TcpStream::connect(addr).await.unwrap();
        let before = socket2::SockRef::from(&kernels).tcp_notsent_lowat().unwrap();
        limit_unsent(&kernels, None);
        assert_eq!(socket2::SockRef::from(&kernels).tcp_notsent_lowat().unwrap(), before);
    }
}
