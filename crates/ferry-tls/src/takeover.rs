//! rustls does the handshake; then the connection's records are ours.
//!
//! [`Paced`] sits under rustls during the handshake and never hands it a
//! byte past the record it is in, pausing after each one: when the
//! handshake completes, nothing of a later record has been read. Then
//! [`take_over`] asks rustls for the traffic keys and their sequence
//! numbers (`dangerous_extract_secrets`, the API kTLS uses) and gives the
//! socket's two directions to a [`RecordReader`] and a [`RecordWriter`]
//! that protect records exactly as rustls would have.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::{Connection, ProtocolVersion, SupportedCipherSuite};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::keys::{Opener, Sealer, HEADER_LEN};
use crate::{RecordReader, RecordWriter};

/// The reading half of a taken-over TCP connection.
pub type TcpReader = RecordReader<OwnedReadHalf>;
/// The writing half of a taken-over TCP connection.
pub type TcpWriter = RecordWriter<OwnedWriteHalf>;

/// Bytes `Paced` reads from the socket at a time: a whole handshake flight.
const PACED_READ: usize = 32 * 1024;

/// The I/O to give rustls for the handshake. It reads the socket in large
/// chunks (so that a peer refused in the handshake finds nothing of its
/// flight left unread, which would turn the close into a reset and lose the
/// alert) but hands rustls one record at a time, pausing after each: when
/// the handshake completes, rustls holds nothing of a later record, and
/// what was read beyond it stays here for the record layer.
pub struct Paced<IO> {
    io: IO,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    header: [u8; HEADER_LEN],
    header_got: usize,
    body_left: usize,
    /// A record just ended: the next read yields once first.
    pause: bool,
}

impl<IO> Paced<IO> {
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: vec![0; PACED_READ].into_boxed_slice(),
            start: 0,
            end: 0,
            header: [0; HEADER_LEN],
            header_got: 0,
            body_left: 0,
            pause: false,
        }
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// The record in progress was handed out completely (or none was begun).
    fn at_record_boundary(&self) -> bool {
        self.header_got == 0 && self.body_left == 0
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Paced<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pause {
            // Give rustls a chance to see that the handshake is over before
            // it asks for the next record (tokio-rustls reads until a read
            // would block).
            this.pause = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if this.start == this.end {
            let mut rb = ReadBuf::new(&mut this.buf);
            std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            this.start = 0;
            this.end = rb.filled().len();
            if this.end == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let want = if this.header_got < HEADER_LEN {
            HEADER_LEN - this.header_got
        } else {
            this.body_left
        };
        let n = want.min(out.remaining()).min(this.end - this.start);
        let bytes = &this.buf[this.start..this.start + n];
        out.put_slice(bytes);
        if this.header_got < HEADER_LEN {
            this.header[this.header_got..this.header_got + n].copy_from_slice(bytes);
            this.header_got += n;
            if this.header_got == HEADER_LEN {
                this.body_left = usize::from(u16::from_be_bytes([this.header[3], this.header[4]]));
            }
        } else {
            this.body_left -= n;
        }
        this.start += n;
        if n > 0 && this.header_got == HEADER_LEN && this.body_left == 0 {
            this.header_got = 0;
            this.pause = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Paced<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a connection could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("the TLS handshake is not complete")]
    Handshaking,
    #[error("negotiated {0:?}; only TLS 1.3 records can be taken over")]
    NotTls13(Option<ProtocolVersion>),
    #[error("rustls still holds records to send")]
    Unsent,
    #[error("the handshake ended inside a record")]
    MidRecord,
    #[error("reading plaintext rustls had already opened")]
    Early(#[source] io::Error),
    #[error("rustls refused to hand over the traffic keys")]
    Extract(#[source] rustls::Error),
    #[error("setting up the record keys")]
    Keys(#[source] crate::RecordError),
}

/// Take the connection's records over from rustls, after the caller has
/// read all it needs from the handshake (peer certificate, channel binding:
/// the rustls connection is consumed here).
///
/// SECURITY: the keys and sequence numbers are rustls's own, so every byte
/// stays inside the TLS 1.3 session that was authenticated; the configs
/// must set `enable_secret_extraction` (ferry-identity's do).
pub fn take_over(
    io: Paced<TcpStream>,
    conn: impl Into<Connection>,
) -> Result<(TcpReader, TcpWriter), TakeOverError> {
    let mut conn: Connection = conn.into();
    if conn.is_handshaking() {
        return Err(TakeOverError::Handshaking);
    }
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return Err(TakeOverError::NotTls13(conn.protocol_version()));
    }
    if conn.wants_write() {
        return Err(TakeOverError::Unsent);
    }
    if !io.at_record_boundary() {
        return Err(TakeOverError::MidRecord);
    }
    let limit = match conn.negotiated_cipher_suite() {
        Some(SupportedCipherSuite::Tls13(s)) => s.common.confidentiality_limit,
        _ => return Err(TakeOverError::NotTls13(conn.protocol_version())),
    };
    let mut early = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        match io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => early.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(TakeOverError::Early(e)),
        }
    }
    let secrets = conn.dangerous_extract_secrets().map_err(TakeOverError::Extract)?;
    let sealer =
        Sealer::from_secrets(&secrets.tx.1, secrets.tx.0, limit).map_err(TakeOverError::Keys)?;
    let opener =
        Opener::from_secrets(&secrets.rx.1, secrets.rx.0, limit).map_err(TakeOverError::Keys)?;
    let leftover = &io.buf[io.start..io.end];
    let (r, w) = io.io.into_split();
    let mut reader = RecordReader::with_ciphertext(r, opener, &early, leftover);
    let mut writer = RecordWriter::new(w, sealer);
    crate::failed::link(&mut reader, &mut writer);
    Ok((reader, writer))
}
