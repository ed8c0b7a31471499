//! A thin tokio driver for the codec: every read and write has a timeout,
//! and a reader's buffer never grows past [`MAX_DATA_LEN`].

use std::pin::Pin;
use std::time::Duration;

use ferry_tls::{RecordBatch, RecordWriter};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

use crate::codec::{FrameError, FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL_LEN, MAX_DATA_LEN};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connection failed while {doing}")]
    Io {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} while {doing}")]
    Timeout { doing: &'static str, after: Duration },
    #[error("peer closed the connection")]
    Closed,
    #[error("malformed frame")]
    Frame(#[from] FrameError),
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
    #[error("control message of {0} bytes exceeds the maximum")]
    ControlTooLong(usize),
    #[error("expected a {expected} frame, got {got:?}")]
    UnexpectedFrame { expected: &'static str, got: FrameKind },
    #[error("a whole frame was asked for in the middle of a data frame read in pieces")]
    MidFrame,
    #[error("{len} bytes of VM state do not fit one batch of {room}")]
    BatchTooLong { len: usize, room: usize },
    #[error("a batch planned with a {0}-byte prefix cannot hold a frame header")]
    BatchPrefix(usize),
}

impl ChannelError {
    /// The underlying I/O error, if any (for TLS diagnostics).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            ChannelError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One frame as read. Data borrows the reader's buffer until the next read.
/// From [`FrameReader::read_piece`], `Data` is part of a data frame's
/// payload: as much as the reader had buffered, borrowed from it.
#[derive(Debug)]
pub enum Incoming<'a> {
    Control(&'a [u8]),
    Data(&'a [u8]),
    DataEnd,
}

pub struct FrameReader<R> {
    inner: R,
    /// Payload buffer. It only grows (up to [`MAX_DATA_LEN`]) and is not
    /// zeroed per frame: a payload of `n` bytes is read into `buf[..n]` and
    /// only `buf[..n]` is handed out, so stale bytes never leak.
    buf: Vec<u8>,
    timeout: Duration,
    /// Payload bytes of the data frame being read in pieces, not handed out yet.
    data_left: usize,
    /// Bytes of `inner`'s buffer handed out as the last piece, consumed at
    /// the next read (the piece borrows them until then).
    handed_out: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, timeout: Duration) -> Self {
        Self { inner, buf: Vec::new(), timeout, data_left: 0, handed_out: 0 }
    }

    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    async fn read_exact_timed(
        inner: &mut R,
        buf: &mut [u8],
        timeout: Duration,
        doing: &'static str,
    ) -> Result<(), ChannelError> {
        match tokio::time::timeout(timeout, inner.read_exact(buf)).await {
            Err(_) => Err(ChannelError::Timeout { doing, after: timeout }),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(ChannelError::Closed)
            }
            Ok(Err(source)) => Err(ChannelError::Io { doing, source }),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// Read one frame, waiting at most the reader's timeout for each part.
    pub async fn read_frame(&mut self) -> Result<Incoming<'_>, ChannelError> {
        if self.data_left > 0 || self.handed_out > 0 {
            return Err(ChannelError::MidFrame);
        }
        self.read_whole_frame().await
    }

    async fn read_whole_frame(&mut self) -> Result<Incoming<'_>, ChannelError> {
        let mut head = [0u8; HEADER_LEN];
        Self::read_exact_timed(&mut self.inner, &mut head, self.timeout, "reading a frame header")
            .await?;
        // SECURITY: the header check bounds `len` by the kind's maximum
        // before the payload buffer is sized.
        let h = FrameHeader::decode(&head)?;
        let n = h.len as usize;
        if self.buf.len() < n {
            // Zero-filled once per growth, not per frame.
            self.buf.resize(n, 0);
        }
        Self::read_exact_timed(
            &mut self.inner,
            &mut self.buf[..n],
            self.timeout,
            "reading a frame payload",
        )
        .await?;
        let payload = &self.buf[..n];
        Ok(match h.kind {
            FrameKind::Control => Incoming::Control(payload),
            FrameKind::Data => Incoming::Data(payload),
            FrameKind::DataEnd => Incoming::DataEnd,
        })
    }

    /// Read a frame that must be a control message of type `T`.
    pub async fn read_control<T: DeserializeOwned>(&mut self) -> Result<T, ChannelError> {
        match self.read_frame().await? {
            Incoming::Control(bytes) => serde_json::from_slice(bytes).map_err(ChannelError::Json),
            Incoming::Data(_) => {
                Err(ChannelError::UnexpectedFrame { expected: "control", got: FrameKind::Data })
            }
            Incoming::DataEnd => {
                Err(ChannelError::UnexpectedFrame { expected: "control", got: FrameKind::DataEnd })
            }
        }
    }
}

impl<R: AsyncBufRead + AsyncRead + Unpin> FrameReader<R> {
    /// The next piece of the stream, without copying VM state: part of the
    /// current data frame's payload (whatever the reader has buffered, up to
    /// the frame's end), or a whole control frame, or the end of data. A
    /// `Data` piece borrows the reader's buffer until the next call.
    pub async fn read_piece(&mut self) -> Result<Incoming<'_>, ChannelError> {
        if self.handed_out > 0 {
            Pin::new(&mut self.inner).consume(self.handed_out);
            self.handed_out = 0;
        }
        while self.data_left == 0 {
            let mut head = [0u8; HEADER_LEN];
            Self::read_exact_timed(
                &mut self.inner,
                &mut head,
                self.timeout,
                "reading a frame header",
            )
            .await?;
            // SECURITY: as in `read_whole_frame`, the header is checked
            // before anything is sized from it.
            let h = FrameHeader::decode(&head)?;
            match h.kind {
                FrameKind::Data => self.data_left = h.len as usize,
                FrameKind::DataEnd => return Ok(Incoming::DataEnd),
                FrameKind::Control => {
                    let n = h.len as usize;
                    if self.buf.len() < n {
                        self.buf.resize(n, 0);
                    }
                    Self::read_exact_timed(
                        &mut self.inner,
                        &mut self.buf[..n],
                        self.timeout,
                        "reading a frame payload",
                    )
                    .await?;
                    return Ok(Incoming::Control(&self.buf[..n]));
                }
            }
        }
        let buffered = match tokio::time::timeout(self.timeout, self.inner.fill_buf()).await {
            Err(_) => {
                return Err(ChannelError::Timeout {
                    doing: "reading a frame payload",
                    after: self.timeout,
                })
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(ChannelError::Closed)
            }
            Ok(Err(source)) => {
                return Err(ChannelError::Io { doing: "reading a frame payload", source })
            }
            Ok(Ok([])) => return Err(ChannelError::Closed),
            Ok(Ok(b)) => b,
        };
        let n = buffered.len().min(self.data_left);
        self.data_left -= n;
        self.handed_out = n;
        Ok(Incoming::Data(&buffered[..n]))
    }
}

async fn timed<F>(timeout: Duration, doing: &'static str, fut: F) -> Result<(), ChannelError>
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(ChannelError::Timeout { doing, after: timeout }),
        Ok(Err(source)) => Err(ChannelError::Io { doing, source }),
        Ok(Ok(())) => Ok(()),
    }
}

/// Write `head` then `payload`, as few writes as the writer allows.
async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    head: &[u8],
    mut payload: &[u8],
) -> std::io::Result<()> {
    let mut head = head;
    while !head.is_empty() {
        let bufs = [std::io::IoSlice::new(head), std::io::IoSlice::new(payload)];
        let n = w.write_vectored(&bufs).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        payload = &payload[n - from_head..];
    }
    w.write_all(payload).await
}

pub struct FrameWriter<W> {
    inner: W,
    timeout: Duration,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub async fn write_control<T: Serialize>(&mut self, msg: &T) -> Result<(), ChannelError> {
        let body = serde_json::to_vec(msg).map_err(ChannelError::Json)?;
        if body.len() > MAX_CONTROL_LEN as usize {
            return Err(ChannelError::ControlTooLong(body.len()));
        }
        let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
        frame.extend_from_slice(&FrameHeader::new(FrameKind::Control, body.len() as u32)?.encode());
        frame.extend_from_slice(&body);
        let inner = &mut self.inner;
        timed(self.timeout, "writing a control message", async move {
            inner.write_all(&frame).await?;
            inner.flush().await
        })
        .await
    }

    /// Write VM state, split into frames of at most [`MAX_DATA_LEN`]. Not
    /// flushed: the caller flushes at the end of a burst.
    ///
    /// Header and payload go down in one vectored write, so over TLS the
    /// 8-byte header shares a record (and a syscall) with the payload
    /// instead of costing a record, a syscall and a TCP segment of its own.
    pub async fn write_data(&mut self, mut data: &[u8]) -> Result<(), ChannelError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_LEN as usize);
            let head = FrameHeader::new(FrameKind::Data, n as u32)?.encode();
            let inner = &mut self.inner;
            let chunk = &data[..n];
            timed(self.timeout, "writing VM state", write_frame(inner, &head, chunk)).await?;
            data = &data[n..];
        }
        Ok(())
    }

    pub async fn write_data_end(&mut self) -> Result<(), ChannelError> {
        let head = FrameHeader::new(FrameKind::DataEnd, 0)?.encode();
        let inner = &mut self.inner;
        timed(self.timeout, "ending VM state", async move {
            inner.write_all(&head).await?;
            inner.flush().await
        })
        .await
    }

    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        let inner = &mut self.inner;
        timed(self.timeout, "flushing", async move { inner.flush().await }).await
    }
}

impl<T: AsyncWrite + Unpin> FrameWriter<RecordWriter<T>> {
    /// Send `len` bytes of VM state that sit in `batch` (planned with a
    /// [`HEADER_LEN`]-byte prefix, see [`RecordBatch::plan`]) as one data
    /// frame sealed where it lies: no copy. `each` sees the VM bytes of
    /// every record just before it is sealed.
    pub async fn write_data_batch(
        &mut self,
        batch: &mut RecordBatch,
        len: usize,
        each: impl FnMut(&[u8]),
    ) -> Result<(), ChannelError> {
        let room = batch.capacity().min(MAX_DATA_LEN as usize);
        if len > room {
            return Err(ChannelError::BatchTooLong { len, room });
        }
        if len == 0 {
            return Ok(());
        }
        let head = FrameHeader::new(FrameKind::Data, len as u32)?.encode();
        let prefix = batch.prefix_mut();
        if prefix.len() != HEADER_LEN {
            return Err(ChannelError::BatchPrefix(prefix.len()));
        }
        prefix.copy_from_slice(&head);
        let send = self.inner.send_batch(batch, len, each);
        timed(self.timeout, "writing VM state", send).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Ping {
        n: u32,
    }

    #[tokio::test]
    async fn frames_cross_a_pipe() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a, Duration::from_secs(5));
        let mut r = FrameReader::new(b, Duration::from_secs(5));
        let big = vec![7u8; MAX_DATA_LEN as usize + 10];
        let writer = tokio::spawn(async move {
            w.write_control(&Ping { n: 3 }).await.unwrap();
            w.write_data(&big).await.unwrap();
            w.write_data_end().await.unwrap();
        });
        assert_eq!(r.read_control::<Ping>().await.unwrap(), Ping { n: 3 });
        let mut got = 0;
        loop {
            match r.read_frame().await.unwrap() {
                Incoming::Data(d) => got += d.len(),
                Incoming::DataEnd => break,
                Incoming::Control(_) => panic!("unexpected control"),
            }
        }
        assert_eq!(got, MAX_DATA_LEN as usize + 10);
        writer.await.unwrap();
    }

    /// A writer that takes at most 3 bytes per call, vectored or not.
    struct Trickle(Vec<u8>);

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let mut left = 3;
            for b in bufs {
                let n = b.len().min(left);
                self.0.extend_from_slice(&b[..n]);
                left -= n;
            }
            std::task::Poll::Ready(Ok(3 - left))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn short_vectored_writes_keep_header_and_payload_in_order() {
        let mut w = FrameWriter::new(Trickle(Vec::new()), Duration::from_secs(1));
        w.write_data(b"hello, frames").await.unwrap();
        w.write_data(b"x").await.unwrap();
        let out = w.into_inner().0;
        let mut want = FrameHeader::new(FrameKind::Data, 13).unwrap().encode().to_vec();
        want.extend_from_slice(b"hello, frames");
        want.extend_from_slice(&FrameHeader::new(FrameKind::Data, 1).unwrap().encode());
        want.push(b'x');
        assert_eq!(out, want);
    }

    #[tokio::test]
    async fn a_short_frame_after_a_long_one_carries_only_its_own_bytes() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut w = FrameWriter::new(a, Duration::from_secs(5));
        let mut r = FrameReader::new(b, Duration::from_secs(5));
        let writer = tokio::spawn(async move {
            w.write_data(&[9u8; 1000]).await.unwrap();
            w.write_data(b"ab").await.unwrap();
            w.write_control(&Ping { n: 1 }).await.unwrap();
        });
        assert!(matches!(r.read_frame().await.unwrap(), Incoming::Data(d) if d.len() == 1000));
        assert!(matches!(r.read_frame().await.unwrap(), Incoming::Data(d) if d == b"ab"));
        assert_eq!(r.read_control::<Ping>().await.unwrap(), Ping { n: 1 });
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (_a, b) = tokio::io::duplex(64);
        let mut r = FrameReader::new(b, Duration::from_millis(50));
        let err = r.read_frame().await.unwrap_err();
        assert!(matches!(err, ChannelError::Timeout { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_hostile_length_is_refused_without_reading_on() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[2, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff]).await.unwrap();
        let mut r = FrameReader::new(b, Duration::from_secs(1));
        let err = r.read_frame().await.unwrap_err();
        assert!(matches!(err, ChannelError::Frame(FrameError::TooLong { .. })), "{err}");
    }

    #[tokio::test]
    async fn truncation_is_reported_as_closed() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(&[1, 0, 0, 0, 0, 0, 0, 9, b'{']).await.unwrap();
        drop(a);
        let mut r = FrameReader::new(b, Duration::from_secs(1));
        assert!(matches!(r.read_frame().await.unwrap_err(), ChannelError::Closed));
    }

    #[tokio::test]
    async fn data_where_control_was_expected_is_refused() {
        let (a, b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(a, Duration::from_secs(1));
        w.write_data(b"xyz").await.unwrap();
        w.flush().await.unwrap();
        let mut r = FrameReader::new(b, Duration::from_secs(1));
        let err = r.read_control::<Ping>().await.unwrap_err();
        assert!(matches!(err, ChannelError::UnexpectedFrame { .. }), "{err}");
    }

    /// Pieces come at most a buffer's worth at a time and never cross a
    /// frame's end; control frames come whole; a whole-frame read in the
    /// middle of a data frame is refused.
    #[tokio::test]
    async fn pieces_follow_the_buffer_and_stop_at_frame_ends() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, Duration::from_secs(5));
        w.write_data(&[1u8; 100]).await.unwrap();
        w.write_control(&Ping { n: 4 }).await.unwrap();
        w.write_data(&[2u8; 30]).await.unwrap();
        w.write_data_end().await.unwrap();
        let mut r =
            FrameReader::new(tokio::io::BufReader::with_capacity(64, b), Duration::from_secs(5));
        let mut data = Vec::new();
        let mut sizes = Vec::new();
        loop {
            match r.read_piece().await.unwrap() {
                Incoming::Data(d) => {
                    sizes.push(d.len());
                    data.extend_from_slice(d);
                }
                Incoming::Control(c) => {
                    assert_eq!(serde_json::from_slice::<Ping>(c).unwrap(), Ping { n: 4 });
                    data.push(b'|');
                }
                Incoming::DataEnd => break,
            }
            if sizes.len() == 1 {
                let mid = r.read_frame().await.unwrap_err();
                assert!(matches!(mid, ChannelError::MidFrame), "{mid}");
            }
        }
        assert!(sizes.iter().all(|&n| n <= 64), "{sizes:?}");
        let mut want = vec![1u8; 100];
        want.push(b'|');
        want.extend_from_slice(&[2u8; 30]);
        assert_eq!(data, want);
    }
}
