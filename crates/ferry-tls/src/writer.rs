//! The sending half: plaintext in, sealed TLS records out.
//!
//! Two ways in. [`AsyncWrite`] copies what it is given into the record
//! being built, seals each record when it is full or flushed, and writes
//! sealed records in large batches: for control messages and anything
//! generic. [`RecordWriter::send_batch`] seals a [`RecordBatch`] where it
//! lies and writes it with one call: the data path, no copy at all.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::batch::RecordBatch;
use crate::failed::IncomingFailed;
use crate::keys::{Sealer, Suite, ALERT, APPLICATION_DATA, HEADER_LEN, MAX_PLAINTEXT, TRAILER_LEN};
use crate::RecordError;

/// Sealed bytes kept before `poll_write` waits for the socket.
const HIGH_WATER: usize = 256 * 1024;

pub struct RecordWriter<W> {
    io: W,
    sealer: Sealer,
    /// Sealed records not yet written (`written..sealed`), then the record
    /// being built: header room and its plaintext so far (`sealed..`).
    out: Vec<u8>,
    written: usize,
    sealed: usize,
    /// A record is being built at `sealed`.
    building: bool,
    /// close_notify has been sealed: nothing more may be.
    closed: bool,
    /// A batch write was interrupted (its future dropped) part-way: the
    /// peer would see a torn record, so nothing more may be written.
    torn: bool,
    /// Raised by the reader of the same connection when its records fail.
    pub(crate) failed: IncomingFailed,
    /// The fatal alert owed after `failed` is sealed (and then sent).
    alert: AlertProgress,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum AlertProgress {
    NotYet,
    Sealed,
    Sent,
}

impl<W: AsyncWrite + Unpin> RecordWriter<W> {
    pub fn new(io: W, sealer: Sealer) -> Self {
        Self {
            io,
            sealer,
            out: Vec::with_capacity(HIGH_WATER + crate::keys::MAX_RECORD),
            written: 0,
            sealed: 0,
            building: false,
            closed: false,
            torn: false,
            failed: IncomingFailed::default(),
            alert: AlertProgress::NotYet,
        }
    }

    pub fn suite(&self) -> Suite {
        self.sealer.suite()
    }

    pub fn get_ref(&self) -> &W {
        &self.io
    }

    fn usable(&self) -> io::Result<()> {
        if self.torn {
            return Err(RecordError::Torn.into());
        }
        if self.failed.is_raised() {
            return Err(RecordError::IncomingFailed.into());
        }
        if self.closed {
            return Err(RecordError::Closed.into());
        }
        Ok(())
    }

    fn building_len(&self) -> usize {
        if self.building {
            self.out.len() - self.sealed - HEADER_LEN
        } else {
            0
        }
    }

    /// Seal the record being built, if any.
    fn seal_building(&mut self, content_type: u8) -> io::Result<()> {
        if !self.building {
            return Ok(());
        }
        self.out.resize(self.out.len() + TRAILER_LEN, 0);
        let rec = &mut self.out[self.sealed..];
        self.sealer.seal(rec, content_type)?;
        self.sealed = self.out.len();
        self.building = false;
        Ok(())
    }

    /// After the reader failed: what was already sealed goes out whole (a
    /// record cut short would read as garbage), plaintext not yet sealed is
    /// dropped, then the fatal alert the reader chose, once; then the
    /// writer refuses.
    fn poll_alert(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(alert) = self.failed.alert() else { return Poll::Ready(Ok(())) };
        if self.torn || self.closed || self.alert == AlertProgress::Sent {
            return Poll::Ready(Ok(()));
        }
        if self.alert == AlertProgress::NotYet {
            self.out.truncate(self.sealed);
            // Alert level fatal (2) and its description.
            self.out.resize(self.out.len() + HEADER_LEN, 0);
            self.out.extend_from_slice(&[2, u8::from(alert)]);
            self.building = true;
            self.seal_building(ALERT)?;
            self.alert = AlertProgress::Sealed;
        }
        ready!(self.poll_drain(cx))?;
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        self.alert = AlertProgress::Sent;
        Poll::Ready(Ok(()))
    }

    /// Once the reader failed: the alert, then the refusal.
    fn poll_refuse(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        // An alert that cannot be written changes nothing: the connection
        // is over either way.
        let _ = ready!(self.poll_alert(cx));
        Poll::Ready(RecordError::IncomingFailed.into())
    }

    /// Write sealed records until none are left or the socket is full.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.sealed {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..self.sealed])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Everything sealed is out: keep only the record being built.
        self.out.copy_within(self.sealed.., 0);
        self.out.truncate(self.out.len() - self.sealed);
        self.written = 0;
        self.sealed = 0;
        Poll::Ready(Ok(()))
    }

    /// Seal what was written so far and send it all, then the prefix and
    /// the first `len` data bytes of `batch` as records sealed in place, in
    /// as few vectored writes as the socket allows. `each_record` sees each
    /// record's data bytes (not the prefix) just before they are sealed,
    /// while they are still in cache, in order.
    ///
    /// Not cancel-safe: if the future is dropped part-way the writer is
    /// unusable from then on (the peer may have seen part of a record).
    pub async fn send_batch(
        &mut self,
        batch: &mut RecordBatch,
        len: usize,
        mut each_record: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        if !self.torn && self.failed.is_raised() {
            return Err(std::future::poll_fn(|cx| self.poll_refuse(cx)).await);
        }
        self.usable()?;
        self.flush().await?;
        let ranges = batch.seal(len, |rec, data_from| {
            each_record(&rec[HEADER_LEN + data_from..rec.len() - TRAILER_LEN]);
            self.sealer.seal(rec, APPLICATION_DATA)
        })?;
        let mut slices = batch.slices(&ranges);
        let mut bufs: &mut [IoSlice<'_>] = &mut slices;
        self.torn = true;
        while !bufs.is_empty() {
            let n = self.io.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.torn = false;
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for RecordWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.torn && this.failed.is_raised() {
            return Poll::Ready(Err(ready!(this.poll_refuse(cx))));
        }
        this.usable()?;
        if this.sealed - this.written >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        let mut took = 0;
        while !buf.is_empty() && this.sealed - this.written < HIGH_WATER {
            if !this.building {
                this.out.resize(this.out.len() + HEADER_LEN, 0);
                this.building = true;
            }
            let n = buf.len().min(MAX_PLAINTEXT - this.building_len());
            this.out.extend_from_slice(&buf[..n]);
            took += n;
            buf = &buf[n..];
            if this.building_len() == MAX_PLAINTEXT {
                this.seal_building(APPLICATION_DATA)?;
            }
        }
        Poll::Ready(Ok(took))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.torn {
            return Poll::Ready(Err(RecordError::Torn.into()));
        }
        if this.failed.is_raised() {
            return Poll::Ready(Err(ready!(this.poll_refuse(cx))));
        }
        this.seal_building(APPLICATION_DATA)?;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// Send close_notify (so the peer can tell the end from a truncation),
    /// then shut the socket's sending side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.torn {
            return Poll::Ready(Err(RecordError::Torn.into()));
        }
        if this.failed.is_raised() {
            // Nothing more is sent but the fatal alert, not even
            // close_notify; then the FIN.
            let _ = ready!(this.poll_alert(cx));
            return Pin::new(&mut this.io).poll_shutdown(cx);
        }
        if !this.closed {
            this.seal_building(APPLICATION_DATA)?;
            // Alert level warning (1), description close_notify (0).
            this.out.resize(this.out.len() + HEADER_LEN, 0);
            this.out.extend_from_slice(&[1, 0]);
            this.building = true;
            this.seal_building(ALERT)?;
            this.closed = true;
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
