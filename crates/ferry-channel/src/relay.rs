//! Relaying a VM stream: QEMU's bytes into data frames on the source
//! ([`SendPump`]) and data frames into QEMU on the destination
//! ([`ReceivePump`]), every byte counted and hashed (BLAKE3) on the way, so
//! that the source can commit to what it sent and the destination can
//! compare that with what it received before the VM may run.
//!
//! The data path of every stream of every migration goes through these two
//! types, and nothing else touches VM bytes: making them cheaper makes every
//! migration cheaper. Neither copies VM bytes in user space. The source
//! reads QEMU's bytes straight into TLS record slots (one vectored read),
//! hashes each record's worth while it is in cache, seals it in place and
//! writes the batch with one call ([`ferry_tls::RecordBatch`]); the
//! destination opens records where they arrived and hashes and writes the
//! plaintext from there ([`FrameReader::read_piece`]).

use std::future::Future;
use std::io::IoSliceMut;
use std::time::Duration;

use ferry_tls::{RecordBatch, RecordWriter};
use ferry_types::Digest32;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::codec::HEADER_LEN;
use crate::io::{ChannelError, FrameReader, FrameWriter, Incoming};

/// TLS records per batch read from QEMU: 64 full records are 1 MiB, more
/// than QEMU's socket ever holds at once (it writes ~220 KB at a time).
pub const SEND_RECORDS: usize = 64;

/// One stream's byte count and BLAKE3 digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSum {
    pub bytes: u64,
    pub digest: Digest32,
}

/// Why a relayed stream stopped, sorted by who is at fault.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading QEMU's stream")]
    ReadQemu(#[source] std::io::Error),
    #[error("QEMU sent nothing for {0:?}")]
    QemuSilent(Duration),
    #[error("writing to QEMU's stream")]
    WriteQemu(#[source] std::io::Error),
    #[error("QEMU stopped reading its stream for {0:?}")]
    QemuStalled(Duration),
    #[error("the peer's connection")]
    Peer(#[source] ChannelError),
}

impl RelayError {
    /// The fault is the local QEMU's, not the peer's.
    pub fn is_qemu(&self) -> bool {
        !matches!(self, RelayError::Peer(_))
    }
}

/// Counts and hashes the bytes of one stream as they pass.
#[derive(Clone, Default)]
pub struct StreamHasher {
    hasher: blake3::Hasher,
    bytes: u64,
}

impl StreamHasher {
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Count and digest of everything so far; hashing may go on.
    pub fn sum(&self) -> StreamSum {
        StreamSum { bytes: self.bytes, digest: Digest32(*self.hasher.finalize().as_bytes()) }
    }
}

/// QEMU's end of a migration stream as the source pump reads it: wait
/// until readable, then one vectored read of what is there.
pub trait QemuSource: Send {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send;
    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize>;
}

impl QemuSource for UnixStream {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        UnixStream::readable(self)
    }
    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        UnixStream::try_read_vectored(self, bufs)
    }
}

impl QemuSource for tokio::net::unix::OwnedReadHalf {
    fn readable(&self) -> impl Future<Output = std::io::Result<()>> + Send {
        tokio::net::unix::OwnedReadHalf::readable(self)
    }
    fn try_read_vectored(&self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
        tokio::net::unix::OwnedReadHalf::try_read_vectored(self, bufs)
    }
}

/// The source side of one stream: QEMU's bytes, hashed, into data frames.
pub struct SendPump<Q = UnixStream> {
    from: Q,
    batch: RecordBatch,
    hash: StreamHasher,
    io_timeout: Duration,
}

impl<Q: QemuSource> SendPump<Q> {
    pub fn new(from: Q, io_timeout: Duration) -> Self {
        Self::with_records(from, io_timeout, SEND_RECORDS)
    }

    /// A pump whose batches hold `records` TLS records (for measurements).
    pub fn with_records(from: Q, io_timeout: Duration, records: usize) -> Self {
        Self { from, batch: RecordBatch::new(records), hash: StreamHasher::default(), io_timeout }
    }

    /// Read what QEMU has ready (at least one byte; waits for it) into the
    /// batch; `Ok(0)` when QEMU closed its stream. Cancel-safe: in a
    /// `select!` a read that loses the race loses no byte.
    pub async fn read(&mut self) -> Result<usize, RelayError> {
        // Records then hold aligned 16 KiB blocks of the stream: BLAKE3's
        // fast path (RecordBatch::plan).
        let to_boundary = (ferry_tls::MAX_PLAINTEXT as u64
            - self.hash.bytes() % ferry_tls::MAX_PLAINTEXT as u64)
            as usize;
        self.batch.plan(HEADER_LEN, to_boundary);
        let read = async {
            loop {
                self.from.readable().await?;
                let mut room = self.batch.read_slices();
                match self.from.try_read_vectored(&mut room) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(self.io_timeout, read).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(RelayError::ReadQemu(e)),
            Err(_) => Err(RelayError::QemuSilent(self.io_timeout)),
        }
    }

    /// Hash the `n` bytes [`read`](Self::read) returned and send them, as
    /// one data frame, written through at once (post-copy's page requests
    /// never wait in a buffer).
    pub async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        n: usize,
        to: &mut FrameWriter<RecordWriter<W>>,
    ) -> Result<(), RelayError> {
        let hash = &mut self.hash;
        to.write_data_batch(&mut self.batch, n, |vm_bytes| hash.update(vm_bytes))
            .await
            .map_err(RelayError::Peer)
    }

    /// Count and digest of what was forwarded so far.
    pub fn sum(&self) -> StreamSum {
        self.hash.sum()
    }

    pub fn bytes(&self) -> u64 {
        self.hash.bytes()
    }

    /// The whole stream: read and forward until QEMU closes it, then end
    /// the data. Returns what was sent.
    pub async fn run<W: AsyncWrite + Unpin>(
        mut self,
        to: &mut FrameWriter<RecordWriter<W>>,
    ) -> Result<StreamSum, RelayError> {
        loop {
            let n = self.read().await?;
            if n == 0 {
                break;
            }
            self.forward(n, to).await?;
        }
        to.write_data_end().await.map_err(RelayError::Peer)?;
        Ok(self.sum())
    }
}

/// What stopped a [`ReceivePump`].
#[derive(Debug)]
pub enum Received {
    /// The source ended the data: the sum of the whole stream.
    End(StreamSum),
    /// A control message inside the stream, with the sum of exactly the bytes
    /// before it. The caller decides what it means; pumping may go on.
    Control(Vec<u8>, StreamSum),
}

/// The destination side of one stream: data frames, hashed, into QEMU.
#[derive(Default)]
pub struct ReceivePump {
    hash: StreamHasher,
}

impl ReceivePump {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn sum(&self) -> StreamSum {
        self.hash.sum()
    }

    /// Feed data frames into `to` until the data ends or a control message
    /// arrives. Each write to QEMU may take at most `io_timeout`. VM bytes
    /// go from the reader's buffer to QEMU as they were received, in pieces
    /// of up to one socket read each.
    pub async fn run<R, W>(
        &mut self,
        from: &mut FrameReader<R>,
        to: &mut W,
        io_timeout: Duration,
    ) -> Result<Received, RelayError>
    where
        R: AsyncBufRead + AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match from.read_piece().await.map_err(RelayError::Peer)? {
                Incoming::Data(d) => {
                    self.hash.update(d);
                    match tokio::time::timeout(io_timeout, to.write_all(d)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Err(RelayError::WriteQemu(e)),
                        Err(_) => return Err(RelayError::QemuStalled(io_timeout)),
                    }
                }
                Incoming::DataEnd => return Ok(Received::End(self.sum())),
                Incoming::Control(bytes) => {
                    return Ok(Received::Control(bytes.to_vec(), self.sum()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ferry_tls::keys::{Opener, Sealer};
    use ferry_tls::{RecordReader, Suite};
    use tokio::io::{AsyncReadExt, DuplexStream};

    const KEY: [u8; 16] = [1; 16];
    const IV: [u8; 12] = [2; 12];

    fn pseudo_random(n: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    type Wire = (FrameWriter<RecordWriter<DuplexStream>>, FrameReader<RecordReader<DuplexStream>>);

    /// Both ends of one direction of a TLS connection, keys fixed.
    fn wire(t: Duration) -> Wire {
        let (a, b) = tokio::io::duplex(1 << 20);
        let sealer = Sealer::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let opener = Opener::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        (
            FrameWriter::new(RecordWriter::new(a, sealer), t),
            FrameReader::new(RecordReader::new(b, opener, b""), t),
        )
    }

    /// A stream relayed through both pumps arrives whole, and both sides
    /// count and hash the same bytes: what the Commit and the gate compare.
    #[tokio::test]
    async fn both_pumps_agree_on_what_crossed() {
        let data = pseudo_random(3 * (1 << 20) + 777);
        let (qemu_src, mut qemu_out) = UnixStream::pair().unwrap();
        let (mut qemu_dst, mut qemu_in) = UnixStream::pair().unwrap();
        let t = Duration::from_secs(5);
        let (mut w, mut r) = wire(t);
        let feed = data.clone();
        let qemu = tokio::spawn(async move {
            qemu_out.write_all(&feed).await.unwrap();
        });
        let send =
            tokio::spawn(async move { SendPump::new(qemu_src, t).run(&mut w).await.unwrap() });
        let recv = tokio::spawn(async move {
            let mut pump = ReceivePump::new();
            let got = pump.run(&mut r, &mut qemu_dst, t).await.unwrap();
            drop(qemu_dst);
            got
        });
        let mut arrived = Vec::new();
        qemu_in.read_to_end(&mut arrived).await.unwrap();
        qemu.await.unwrap();
        let sent = send.await.unwrap();
        let Received::End(received) = recv.await.unwrap() else { panic!("no end") };
        assert_eq!(arrived, data);
        assert_eq!(sent, received);
        assert_eq!(sent.bytes, data.len() as u64);
        assert_eq!(sent.digest.0, *blake3::hash(&data).as_bytes());
    }

    /// Post-copy's in-line Commit: a control message after pumped data
    /// stops the receiving pump with the sum of exactly the bytes before it,
    /// which is what the source committed to.
    #[tokio::test]
    async fn a_control_message_stops_the_pump_with_the_sum_before_it() {
        let t = Duration::from_secs(5);
        let (qemu_src, mut qemu_out) = UnixStream::pair().unwrap();
        let (mut w, mut r) = wire(t);
        qemu_out.write_all(b"before").await.unwrap();
        let mut pump = SendPump::new(qemu_src, t);
        let n = pump.read().await.unwrap();
        pump.forward(n, &mut w).await.unwrap();
        let committed = pump.sum();
        w.write_control(&serde_json::json!({"type": "commit"})).await.unwrap();
        w.write_data(b"after").await.unwrap();
        w.write_data_end().await.unwrap();
        let mut sink = Vec::new();
        let mut rp = ReceivePump::new();
        let Received::Control(msg, at) = rp.run(&mut r, &mut sink, t).await.unwrap() else {
            panic!("no control")
        };
        assert!(String::from_utf8(msg).unwrap().contains("commit"));
        assert_eq!(at, committed);
        assert_eq!(at.digest.0, *blake3::hash(b"before").as_bytes());
        let Received::End(all) = rp.run(&mut r, &mut sink, t).await.unwrap() else {
            panic!("no end")
        };
        assert_eq!(sink, b"beforeafter");
        assert_eq!(all.digest.0, *blake3::hash(b"beforeafter").as_bytes());
    }

    /// A bit flipped on the wire stops the destination with the peer at
    /// fault; QEMU is never handed a byte of the tampered record.
    #[tokio::test]
    async fn a_tampered_record_stops_the_receiving_pump() {
        let t = Duration::from_secs(5);
        let (a, mut tap) = tokio::io::duplex(4 << 20);
        let sealer = Sealer::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let mut w = FrameWriter::new(RecordWriter::new(a, sealer), t);
        let data = pseudo_random(200_000);
        w.write_data(&data).await.unwrap();
        w.write_data_end().await.unwrap();
        drop(w);
        let mut bytes = Vec::new();
        tap.read_to_end(&mut bytes).await.unwrap();
        bytes[100_000] ^= 1;
        let (mut c, d) = tokio::io::duplex(4 << 20);
        c.write_all(&bytes).await.unwrap();
        let opener = Opener::new(Suite::Aes128Gcm, &KEY, IV, 0, u64::MAX).unwrap();
        let mut r = FrameReader::new(RecordReader::new(d, opener, b""), t);
        let mut sink = Vec::new();
        let err = ReceivePump::new().run(&mut r, &mut sink, t).await.unwrap_err();
        assert!(matches!(err, RelayError::Peer(_)) && !err.is_qemu(), "{err}");
        assert!(
            sink.len() < 100_000 && data.starts_with(&sink),
            "{} bytes reached QEMU",
            sink.len()
        );
    }

    #[tokio::test]
    async fn a_silent_qemu_is_its_own_fault() {
        let (qemu_src, _keep) = UnixStream::pair().unwrap();
        let (mut w, _r) = wire(Duration::from_secs(1));
        let err = SendPump::new(qemu_src, Duration::from_millis(50)).run(&mut w).await.unwrap_err();
        assert!(matches!(err, RelayError::QemuSilent(_)) && err.is_qemu(), "{err}");
    }
}
