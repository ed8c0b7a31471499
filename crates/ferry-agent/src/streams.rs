//! Parallel data streams (QEMU multifd). QEMU opens one main channel and N
//! multifd channels; Ferry carries the main channel on the migration's
//! control connection and each multifd channel on its own mTLS connection
//! from the same source host, joined to the migration by id. Each stream is
//! hashed on both sides; the Commit names the combination of all of them.
//!
//! QEMU 7.2's destination takes the first connection to its incoming socket
//! as the main channel, so the destination connects the main stream first.

use std::time::Duration;

use ferry_types::{Digest32, HostName, MigrationId};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use crate::protocol::PeerMessage;
use crate::server::Reader;

/// Most streams one migration may use (main + multifd channels).
pub const MAX_STREAMS: u8 = 8;

/// One stream's count and digest.
pub type StreamSum = (u64, Digest32);

/// What a Commit names: a single stream's own count and digest, or for
/// several, their sum and a digest over each stream's (index, count, digest).
pub fn combine(streams: &[StreamSum]) -> StreamSum {
    if let [one] = streams {
        return *one;
    }
    let mut h = blake3::Hasher::new();
    h.update(b"ferry streams v1");
    let mut total = 0u64;
    for (i, (bytes, digest)) in streams.iter().enumerate() {
        h.update(&(i as u64).to_le_bytes());
        h.update(&bytes.to_le_bytes());
        h.update(&digest.0);
        total += bytes;
    }
    (total, Digest32(*h.finalize().as_bytes()))
}

/// A destination migration waiting for its extra streams.
pub struct JoinSlot {
    pub source: HostName,
    pub streams: u8,
    pub tx: mpsc::Sender<(u8, Reader)>,
}

/// Source side: carry one QEMU multifd channel over its own connection.
pub async fn send_stream(
    agent: &crate::Agent,
    to: &HostName,
    addr: std::net::SocketAddr,
    id: MigrationId,
    index: u8,
    qemu: UnixStream,
) -> Result<StreamSum, String> {
    let mig = &agent.cfg.migration;
    let config = agent.tls.client().map_err(|e| crate::chain(&e))?;
    let (stream, _) =
        crate::client::connect(addr, to, config, &agent.domain, mig.connect_timeout())
            .await
            .map_err(|e| format!("stream {index}: {}", crate::chain(&e)))?;
    let (_reader, mut writer) = crate::client::greet(stream, to, addr, mig.io_timeout())
        .await
        .map_err(|e| format!("stream {index}: {}", crate::chain(&e)))?;
    writer
        .write_control(&PeerMessage::StreamJoin { migration_id: id, index })
        .await
        .map_err(|e| format!("stream {index}: {}", crate::chain(&e)))?;
    let sum = ferry_channel::SendPump::new(qemu, mig.io_timeout())
        .run(&mut writer)
        .await
        .map_err(|e| format!("stream {index} to {to}: {}", crate::chain(&e)))?;
    Ok((sum.bytes, sum.digest))
}

/// Destination side: feed one stream's data frames into a QEMU socket,
/// hashing them, until end of data.
pub async fn pump_into_qemu(
    reader: &mut Reader,
    qemu: &mut UnixStream,
    io_timeout: Duration,
) -> Result<StreamSum, String> {
    let sum = pump_frames(reader, &mut *qemu, io_timeout, None, None).await?;
    let _ = qemu.shutdown().await;
    Ok(sum)
}

/// A Commit found in-line, with the count and digest of the bytes before it.
pub type InlineCommit = (ferry_audit::Signed, StreamSum);

/// Destination side, every stream: data frames into QEMU, hashed, until end
/// of data. An in-line Commit (post-copy's switchover) goes to `commits`
/// with the sum of exactly the bytes before it; without `commits` it is
/// refused like any other control message. `stop` ends the pump early.
pub async fn pump_frames<W: tokio::io::AsyncWrite + Unpin>(
    reader: &mut Reader,
    mut to_qemu: W,
    io_timeout: Duration,
    commits: Option<mpsc::Sender<InlineCommit>>,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> Result<StreamSum, String> {
    let mut pump = ferry_channel::ReceivePump::new();
    loop {
        let stopped = async {
            match stop.as_mut() {
                Some(s) => drop(s.changed().await),
                None => std::future::pending::<()>().await,
            }
        };
        let got = tokio::select! {
            r = pump.run(reader, &mut to_qemu, io_timeout) => r,
            () = stopped => return Err("stopped".to_owned()),
        };
        let got = match got {
            Ok(g) => g,
            Err(ferry_channel::RelayError::WriteQemu(e)) => {
                return Err(format!("destination QEMU stopped reading its stream: {e}"))
            }
            Err(ferry_channel::RelayError::QemuStalled(t)) => {
                return Err(format!("destination QEMU stalled for {t:?}"))
            }
            Err(e) => return Err(crate::chain(&e)),
        };
        match got {
            ferry_channel::Received::End(sum) => return Ok((sum.bytes, sum.digest)),
            ferry_channel::Received::Control(bytes, sum) => {
                match (serde_json::from_slice::<PeerMessage>(&bytes), &commits) {
                    (Ok(PeerMessage::Commit { signed }), Some(tx)) => {
                        let at = (sum.bytes, sum.digest);
                        tx.send((signed, at))
                            .await
                            .map_err(|_| "commit after the control side ended".to_owned())?;
                    }
                    (Ok(PeerMessage::Abort { reason, .. }), _) => {
                        return Err(format!("source aborted: {reason}"))
                    }
                    (Ok(m), _) => {
                        return Err(format!("unexpected {} during the transfer", m.name()))
                    }
                    (Err(e), _) => {
                        return Err(format!("malformed control message during the transfer: {e}"))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stream_is_its_own_commit_and_several_are_order_sensitive() {
        let a = (10, Digest32([1; 32]));
        let b = (20, Digest32([2; 32]));
        assert_eq!(combine(&[a]), a);
        let ab = combine(&[a, b]);
        assert_eq!(ab.0, 30);
        assert_ne!(ab, combine(&[b, a]), "swapping streams must change the commit");
        assert_ne!(ab.1, combine(&[a, (20, Digest32([3; 32]))]).1);
    }
}
