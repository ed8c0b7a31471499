//! The receiving half: TLS records in, plaintext out, opened in place.
//!
//! One large read from the socket brings many records; each is opened in
//! one pass from the ciphertext buffer into the plaintext buffer, behind
//! the previous one's plaintext, so [`AsyncBufRead::poll_fill_buf`] hands
//! out up to a whole read's worth of plaintext as one slice. [`AsyncRead`]
//! copies out of it, for callers that want their own buffer.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::AlertDescription;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use crate::failed::IncomingFailed;
use crate::keys::{
    body_len, OpenError, Opener, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN, MAX_RECORD,
};
use crate::RecordError;

/// Ciphertext read from the socket at a time, at most.
pub const READ_BUFFER: usize = 256 * 1024;

/// Why the reader stopped for good. Kept so that every later call reports
/// the same error (an `io::Error` cannot be cloned).
#[derive(Clone, Debug)]
enum Stopped {
    /// close_notify received: a clean end.
    PeerClosed,
    Decrypt,
    Alert(AlertDescription),
    Record(RecordError),
}

impl Stopped {
    /// The fatal alert RFC 8446 §6.2 names for this failure; None for a
    /// clean end and for the peer's own alert.
    fn alert(&self) -> Option<AlertDescription> {
        match self {
            Stopped::PeerClosed | Stopped::Alert(_) => None,
            Stopped::Decrypt => Some(AlertDescription::BadRecordMac),
            Stopped::Record(e) => Some(match e {
                RecordError::RecordOverflow(_) => AlertDescription::RecordOverflow,
                RecordError::UnexpectedRecordType(_)
                | RecordError::UnexpectedInnerType(_)
                | RecordError::NoContentType
                | RecordError::PostHandshake(_) => AlertDescription::UnexpectedMessage,
                RecordError::BadVersion(_)
                | RecordError::RecordTooShort(_)
                | RecordError::BadAlert(_)
                | RecordError::Truncated => AlertDescription::DecodeError,
                _ => AlertDescription::InternalError,
            }),
        }
    }

    fn error(&self) -> Option<io::Error> {
        let tls = |e| io::Error::new(io::ErrorKind::InvalidData, e);
        match self {
            Stopped::PeerClosed => None,
            Stopped::Decrypt => Some(tls(rustls::Error::DecryptError)),
            Stopped::Alert(a) => Some(tls(rustls::Error::AlertReceived(*a))),
            Stopped::Record(r) => Some(r.clone().into()),
        }
    }
}

pub struct RecordReader<R> {
    io: R,
    opener: Opener,
    /// Ciphertext read from the socket; `cipher_start..filled` not opened yet.
    cipher: Box<[u8]>,
    cipher_start: usize,
    filled: usize,
    /// Most bytes one read from the socket may bring.
    read_size: usize,
    /// Opened plaintext; `plain_start..plain_end` not handed out yet.
    plain: Box<[u8]>,
    plain_start: usize,
    plain_end: usize,
    stopped: Option<Stopped>,
    /// Raised when this direction fails (not on a clean end or a cut
    /// connection): the writer of the same connection stops too.
    pub(crate) failed: IncomingFailed,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// `early` is plaintext rustls had already opened before the hand-over.
    pub fn new(io: R, opener: Opener, early: &[u8]) -> Self {
        Self::with_ciphertext(io, opener, early, &[])
    }

    /// As [`new`](Self::new), with `ciphertext` already read from the
    /// socket (records after the handshake) coming before the socket's.
    pub fn with_ciphertext(io: R, opener: Opener, early: &[u8], ciphertext: &[u8]) -> Self {
        let room = READ_BUFFER.max(ciphertext.len()) + MAX_RECORD;
        let mut cipher = vec![0u8; room].into_boxed_slice();
        cipher[..ciphertext.len()].copy_from_slice(ciphertext);
        let mut plain = vec![0u8; room.max(early.len())].into_boxed_slice();
        plain[..early.len()].copy_from_slice(early);
        Self {
            io,
            opener,
            cipher,
            cipher_start: 0,
            filled: ciphertext.len(),
            read_size: READ_BUFFER,
            plain,
            plain_start: 0,
            plain_end: early.len(),
            stopped: None,
            failed: IncomingFailed::default(),
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// Read at most `bytes` from the socket at a time (1 ..= [`READ_BUFFER`]):
    /// fewer system calls against a smaller, cache-warmer working set.
    pub fn set_read_size(&mut self, bytes: usize) {
        self.read_size = bytes.clamp(1, READ_BUFFER);
    }

    /// Open every whole record read so far, packing plaintexts together.
    /// Only called with all plaintext handed out (`plain_end == 0`).
    fn open_buffered(&mut self) {
        self.open_records();
        // A clean close_notify leaves the other direction open (TLS 1.3
        // half-close); anything else found in a record ends both.
        if let Some(stopped) = &self.stopped {
            if !matches!(stopped, Stopped::PeerClosed) {
                self.failed.raise(stopped.alert());
            }
        }
    }

    fn open_records(&mut self) {
        while self.stopped.is_none() && self.filled - self.cipher_start >= HEADER_LEN {
            let at = self.cipher_start;
            let Ok(head) = <[u8; HEADER_LEN]>::try_from(&self.cipher[at..at + HEADER_LEN]) else {
                return;
            };
            let len = match body_len(&head) {
                Ok(len) => len,
                Err(e) => {
                    self.stopped = Some(Stopped::Record(e));
                    return;
                }
            };
            let end = at + HEADER_LEN + len;
            if end > self.filled {
                return;
            }
            // Plaintext is shorter than its record, and everything opened
            // since the last hand-out came from this buffer: it fits.
            let opened =
                self.opener.open_into(&self.cipher[at..end], &mut self.plain[self.plain_end..]);
            self.cipher_start = end;
            let opened = match opened {
                Ok(o) => o,
                Err(OpenError::Tls(_)) => {
                    self.stopped = Some(Stopped::Decrypt);
                    return;
                }
                Err(OpenError::Record(e)) => {
                    self.stopped = Some(Stopped::Record(e));
                    return;
                }
            };
            let content = &self.plain[self.plain_end..self.plain_end + opened.len];
            match opened.content_type {
                APPLICATION_DATA => self.plain_end += opened.len,
                ALERT => {
                    self.stopped = Some(match content {
                        [_, 0] => Stopped::PeerClosed,
                        [_, d] => Stopped::Alert(AlertDescription::from(*d)),
                        _ => Stopped::Record(RecordError::BadAlert(content.len())),
                    })
                }
                HANDSHAKE => {
                    let kind = content.first().copied().unwrap_or(0);
                    self.stopped = Some(Stopped::Record(RecordError::PostHandshake(kind)));
                }
                other => {
                    self.stopped = Some(Stopped::Record(RecordError::UnexpectedInnerType(other)))
                }
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncBufRead for RecordReader<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        loop {
            if this.plain_start < this.plain_end {
                return Poll::Ready(Ok(&this.plain[this.plain_start..this.plain_end]));
            }
            // Plaintext before a stop is authentic and handed out first.
            if let Some(s) = &this.stopped {
                return Poll::Ready(match s.error() {
                    None => Ok(&[]),
                    Some(e) => Err(e),
                });
            }
            // Everything handed out: plaintext restarts at the front, and a
            // partial record moves there too (less than one record's worth).
            this.plain_start = 0;
            this.plain_end = 0;
            if this.cipher_start > 0 {
                this.cipher.copy_within(this.cipher_start..this.filled, 0);
                this.filled -= this.cipher_start;
                this.cipher_start = 0;
            }
            this.open_buffered();
            if this.plain_end > 0 || this.stopped.is_some() {
                continue;
            }
            let room = (this.filled + this.read_size).min(this.cipher.len());
            let mut rb = ReadBuf::new(&mut this.cipher[this.filled..room]);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // SECURITY: a TCP end without close_notify may be an attacker
                // cutting the stream; it is an error, never a clean end.
                this.stopped = Some(Stopped::Record(RecordError::Truncated));
                continue;
            }
            this.filled += n;
        }
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.plain_start = (this.plain_start + amt).min(this.plain_end);
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for RecordReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let got = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = got.len().min(out.remaining());
        out.put_slice(&got[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}
