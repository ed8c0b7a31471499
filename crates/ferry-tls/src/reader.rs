//! The receiving half: TLS records in, plaintext out, opened in place.
//!
//! One large read from the socket brings many records; each is opened where
//! it lies and its plaintext packed behind the previous one's, so
//! [`AsyncBufRead::poll_fill_buf`] hands out up to a whole read's worth of
//! plaintext as one slice without copying it. [`AsyncRead`] copies out of
//! the same buffer, for callers that want their own.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use rustls::AlertDescription;
use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

use crate::keys::{body_len, OpenError, Opener, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER_LEN};
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
    buf: Vec<u8>,
    /// Plaintext ready to hand out.
    plain_start: usize,
    plain_end: usize,
    /// Ciphertext not opened yet (`cipher_start..filled`); always at or
    /// after `plain_end`, because a record's plaintext is shorter than it.
    cipher_start: usize,
    filled: usize,
    stopped: Option<Stopped>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// `early` is plaintext rustls had already opened before the hand-over.
    pub fn new(io: R, opener: Opener, early: &[u8]) -> Self {
        Self::with_ciphertext(io, opener, early, &[])
    }

    /// As [`new`](Self::new), with `ciphertext` already read from the
    /// socket (records after the handshake) coming before the socket's.
    pub fn with_ciphertext(io: R, opener: Opener, early: &[u8], ciphertext: &[u8]) -> Self {
        let (p, c) = (early.len(), ciphertext.len());
        let mut buf = vec![0u8; READ_BUFFER.max(p + c) + crate::keys::MAX_RECORD];
        buf[..p].copy_from_slice(early);
        buf[p..p + c].copy_from_slice(ciphertext);
        Self {
            io,
            opener,
            buf,
            plain_start: 0,
            plain_end: p,
            cipher_start: p,
            filled: p + c,
            stopped: None,
        }
    }

    pub fn get_ref(&self) -> &R {
        &self.io
    }

    /// Open every whole record in the buffer, packing plaintexts together.
    fn open_buffered(&mut self) {
        while self.stopped.is_none() && self.filled - self.cipher_start >= HEADER_LEN {
            let head: [u8; HEADER_LEN] =
                match self.buf[self.cipher_start..][..HEADER_LEN].try_into() {
                    Ok(h) => h,
                    Err(_) => return,
                };
            let len = match body_len(&head) {
                Ok(len) => len,
                Err(e) => {
                    self.stopped = Some(Stopped::Record(e));
                    return;
                }
            };
            let end = self.cipher_start + HEADER_LEN + len;
            if end > self.filled {
                return;
            }
            let at = self.cipher_start - self.plain_end;
            let opened = self.opener.open(&mut self.buf[self.plain_end..end], at);
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
            let content = &self.buf[self.plain_end..self.plain_end + opened.len];
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
                return Poll::Ready(Ok(&this.buf[this.plain_start..this.plain_end]));
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
                this.buf.copy_within(this.cipher_start..this.filled, 0);
                this.filled -= this.cipher_start;
                this.cipher_start = 0;
            }
            this.open_buffered();
            if this.plain_end > 0 || this.stopped.is_some() {
                continue;
            }
            let room = (this.filled + READ_BUFFER).min(this.buf.len());
            let mut rb = ReadBuf::new(&mut this.buf[this.filled..room]);
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
