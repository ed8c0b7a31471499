//! Relaying a VM stream: QEMU's bytes into data frames on the source
//! ([`SendPump`]) and data frames into QEMU on the destination
//! ([`ReceivePump`]), every byte counted and hashed (BLAKE3) on the way, so
//! that the source can commit to what it sent and the destination can
//! compare that with what it received before the VM may run.
//!
//! The data path of every stream of every migration goes through these two
//! types, and nothing else touches VM bytes: making them cheaper makes every
//! migration cheaper.

use std::time::Duration;

use ferry_types::Digest32;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::io::{ChannelError, FrameReader, FrameWriter, Incoming};

/// Bytes read from QEMU per frame: large reads keep the per-frame cost low
/// (QEMU writes a few hundred KiB at a time).
pub const SEND_CHUNK: usize = 1024 * 1024;

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

/// The source side of one stream: QEMU's bytes, hashed, into data frames.
pub struct SendPump<R> {
    from: R,
    buf: Vec<u8>,
    hash: StreamHasher,
    io_timeout: Duration,
    flush_each: bool,
}

impl<R: AsyncRead + Unpin> SendPump<R> {
    pub fn new(from: R, io_timeout: Duration) -> Self {
        Self {
            from,
            buf: vec![0; SEND_CHUNK],
            hash: StreamHasher::default(),
            io_timeout,
            flush_each: false,
        }
    }

    /// Flush after every chunk: post-copy's page requests must not wait in a
    /// buffer while the destination's vCPU is stalled on them.
    pub fn flushing(mut self, on: bool) -> Self {
        self.flush_each = on;
        self
    }

    /// Read QEMU's next chunk; `Ok(0)` when QEMU closed its stream.
    /// Cancel-safe: in a `select!` a read that loses the race loses no byte.
    pub async fn read(&mut self) -> Result<usize, RelayError> {
        match tokio::time::timeout(self.io_timeout, self.from.read(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(RelayError::ReadQemu(e)),
            Err(_) => Err(RelayError::QemuSilent(self.io_timeout)),
        }
    }

    /// Hash the `n` bytes [`read`](Self::read) returned and send them.
    pub async fn forward<W: AsyncWrite + Unpin>(
        &mut self,
        n: usize,
        to: &mut FrameWriter<W>,
    ) -> Result<(), RelayError> {
        let chunk = &self.buf[..n];
        self.hash.update(chunk);
        to.write_data(chunk).await.map_err(RelayError::Peer)?;
        if self.flush_each {
            to.flush().await.map_err(RelayError::Peer)?;
        }
        Ok(())
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
        to: &mut FrameWriter<W>,
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
    /// arrives. Each write to QEMU may take at most `io_timeout`.
    pub async fn run<R, W>(
        &mut self,
        from: &mut FrameReader<R>,
        to: &mut W,
        io_timeout: Duration,
    ) -> Result<Received, RelayError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        loop {
            match from.read_frame().await.map_err(RelayError::Peer)? {
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

    /// A stream relayed through both pumps arrives whole, and both sides
    /// count and hash the same bytes: what the Commit and the gate compare.
    #[tokio::test]
    async fn both_pumps_agree_on_what_crossed() {
        let data = pseudo_random(3 * SEND_CHUNK + 777);
        let (mut qemu_out, qemu_src) = tokio::io::duplex(1 << 16);
        let (wire_a, wire_b) = tokio::io::duplex(1 << 16);
        let (mut qemu_dst, mut qemu_in) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let feed = data.clone();
        let qemu = tokio::spawn(async move {
            qemu_out.write_all(&feed).await.unwrap();
        });
        let send = tokio::spawn(async move {
            let mut w = FrameWriter::new(wire_a, t);
            SendPump::new(qemu_src, t).run(&mut w).await.unwrap()
        });
        let recv = tokio::spawn(async move {
            let mut r = FrameReader::new(wire_b, t);
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

    #[tokio::test]
    async fn a_control_message_stops_the_pump_with_the_sum_before_it() {
        let (wire_a, wire_b) = tokio::io::duplex(1 << 16);
        let t = Duration::from_secs(5);
        let mut w = FrameWriter::new(wire_a, t);
        w.write_data(b"before").await.unwrap();
        w.write_control(&serde_json::json!({"type": "commit"})).await.unwrap();
        w.write_data(b"after").await.unwrap();
        w.write_data_end().await.unwrap();
        let mut r = FrameReader::new(wire_b, t);
        let mut sink = Vec::new();
        let mut pump = ReceivePump::new();
        let Received::Control(msg, at) = pump.run(&mut r, &mut sink, t).await.unwrap() else {
            panic!("no control")
        };
        assert!(String::from_utf8(msg).unwrap().contains("commit"));
        assert_eq!(at.bytes, 6);
        assert_eq!(at.digest.0, *blake3::hash(b"before").as_bytes());
        let Received::End(all) = pump.run(&mut r, &mut sink, t).await.unwrap() else {
            panic!("no end")
        };
        assert_eq!(sink, b"beforeafter");
        assert_eq!(all.digest.0, *blake3::hash(b"beforeafter").as_bytes());
    }

    #[tokio::test]
    async fn a_silent_qemu_is_its_own_fault() {
        let (_keep, qemu_src) = tokio::io::duplex(64);
        let (wire_a, _wire_b) = tokio::io::duplex(64);
        let mut w = FrameWriter::new(wire_a, Duration::from_secs(1));
        let err = SendPump::new(qemu_src, Duration::from_millis(50)).run(&mut w).await.unwrap_err();
        assert!(matches!(err, RelayError::QemuSilent(_)) && err.is_qemu(), "{err}");
    }
}
