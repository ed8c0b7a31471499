//! Parallel data streams (QEMU multifd). QEMU opens one main channel and N
//! multifd channels; Ferry carries the main channel on the migration's
//! control connection and each multifd channel on its own mTLS connection
//! from the same source host, joined to the migration by id. Each stream is
//! hashed on both sides; the Commit names the combination of all of them.

use std::time::Duration;

use ferry_channel::{ReceivePump, Received, SendPump, StreamSum};
use ferry_types::{Digest32, HostName, MigrationId, VmName};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use super::link;
use crate::agent::Agent;
use crate::backend::ChannelKind;
use crate::error::Error;
use crate::net::Reader;
use crate::protocol::PeerMessage;

/// What a Commit names: a single stream's own count and digest, or for
/// several, their sum and a digest over each stream's (index, count, digest).
pub fn combine(streams: &[StreamSum]) -> StreamSum {
    if let [one] = streams {
        return *one;
    }
    let mut h = blake3::Hasher::new();
    h.update(b"ferry streams v1");
    let mut bytes = 0u64;
    for (i, s) in streams.iter().enumerate() {
        h.update(&(i as u64).to_le_bytes());
        h.update(&s.bytes.to_le_bytes());
        h.update(&s.digest.0);
        bytes += s.bytes;
    }
    StreamSum { bytes, digest: Digest32(*h.finalize().as_bytes()) }
}

/// Source side: carry one QEMU multifd channel over its own connection,
/// until QEMU closes it or `stop` (libvirt's migration: its channels stay
/// open until after the gate, so the stream ends once the destination
/// loaded everything; nothing more is sent on them before it opens).
pub async fn send_joined(
    agent: &Agent,
    to: &HostName,
    id: MigrationId,
    index: u8,
    qemu: UnixStream,
    mut stop: watch::Receiver<bool>,
) -> Result<StreamSum, Error> {
    let mut link = link::open(agent, to).await?;
    let join = PeerMessage::StreamJoin { migration_id: id, index };
    link.writer
        .write_control(&join)
        .await
        .map_err(|source| Error::Link { host: to.clone(), source })?;
    let mut pump = SendPump::new(qemu, agent.cfg.migration.io_timeout());
    loop {
        tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            n = pump.read() => {
                let n = n.map_err(|e| Error::relay(e, to))?;
                if n == 0 {
                    break;
                }
                pump.forward(n, &mut link.writer).await.map_err(|e| Error::relay(e, to))?;
            }
        }
    }
    link.writer
        .write_data_end()
        .await
        .map_err(|source| Error::Link { host: to.clone(), source })?;
    Ok(pump.sum())
}

/// Once `stop` says so; never if its sender goes away (the transfer then
/// ends and aborts the stream's task anyway).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Destination side: one stream's data frames into QEMU, hashed, until the
/// source ends the data. A control message inside a joined stream is a
/// protocol error (only the main stream carries them).
pub async fn pump_into(
    reader: &mut Reader,
    mut qemu: UnixStream,
    io_timeout: Duration,
    source: &HostName,
) -> Result<StreamSum, Error> {
    let mut pump = ReceivePump::new();
    let received =
        pump.run(reader, &mut qemu, io_timeout).await.map_err(|e| Error::relay(e, source))?;
    let _ = qemu.shutdown().await;
    match received {
        Received::End(sum) => Ok(sum),
        Received::Control(bytes, _) => Err(inline_control(&bytes, source)),
    }
}

/// A control message where only VM data may come: the source's Abort, or a
/// protocol error that names what came.
pub fn inline_control(bytes: &[u8], source: &HostName) -> Error {
    match serde_json::from_slice::<PeerMessage>(bytes) {
        Ok(PeerMessage::Abort { reason, .. }) => {
            Error::PeerAborted { host: source.clone(), reason }
        }
        Ok(m) => Error::Mismatch(format!("unexpected {} during the transfer", m.name())),
        Err(e) => Error::Mismatch(format!("malformed control message during the transfer: {e}")),
    }
}

/// Destination side: wait for the `streams - 1` joined streams and feed
/// each into QEMU. Returns their sums by index (1-based order).
pub async fn receive_joined(
    agent: &Agent,
    vm: &VmName,
    source: &HostName,
    streams: u8,
    mut rx: mpsc::Receiver<(u8, Reader)>,
) -> Result<Vec<(u8, StreamSum)>, Error> {
    let io_timeout = agent.cfg.migration.io_timeout();
    let mut pumps = tokio::task::JoinSet::new();
    for _ in 1..streams {
        let Some((index, mut reader)) =
            tokio::time::timeout(io_timeout, rx.recv()).await.ok().flatten()
        else {
            return Err(Error::Mismatch(format!(
                "only some of {streams} streams joined within {io_timeout:?}"
            )));
        };
        let qemu = agent.backend.connect_incoming(vm, ChannelKind::Multifd(index)).await?;
        let source = source.clone();
        pumps.spawn(async move {
            let pumped = pump_into(&mut reader, qemu, io_timeout, &source).await;
            if let Err(e) = &pumped {
                tracing::warn!(index, error = %crate::report::report(e), "a joined stream failed");
            }
            pumped.map(|s| (index, s))
        });
    }
    let mut sums = Vec::new();
    while let Some(r) = pumps.join_next().await {
        let r = r.map_err(|e| Error::Mismatch(format!("a stream task failed: {e}")))?;
        sums.push(r?);
    }
    Ok(sums)
}

/// Put each stream's sum in its place; every index exactly once.
pub fn in_order(
    streams: u8,
    main: StreamSum,
    joined: Vec<(u8, StreamSum)>,
) -> Result<Vec<StreamSum>, Error> {
    let mut slots = vec![None; streams as usize];
    slots[0] = Some(main);
    for (index, sum) in joined {
        let slot = slots
            .get_mut(index as usize)
            .ok_or_else(|| Error::Mismatch(format!("stream index {index} out of range")))?;
        if slot.replace(sum).is_some() {
            return Err(Error::Mismatch(format!("stream {index} joined twice")));
        }
    }
    slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Mismatch("a stream is missing".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(bytes: u64, d: u8) -> StreamSum {
        StreamSum { bytes, digest: Digest32([d; 32]) }
    }

    #[test]
    fn one_stream_is_its_own_commit_and_several_are_order_sensitive() {
        let (a, b) = (s(10, 1), s(20, 2));
        assert_eq!(combine(&[a]), a);
        let ab = combine(&[a, b]);
        assert_eq!(ab.bytes, 30);
        assert_ne!(ab, combine(&[b, a]), "swapping streams must change the commit");
        assert_ne!(ab.digest, combine(&[a, s(20, 3)]).digest);
    }

    #[test]
    fn every_stream_index_exactly_once() {
        let main = s(1, 1);
        assert_eq!(in_order(3, main, vec![(2, s(3, 3)), (1, s(2, 2))]).unwrap().len(), 3);
        assert!(in_order(3, main, vec![(1, s(2, 2))]).is_err(), "missing");
        assert!(in_order(3, main, vec![(1, s(2, 2)), (1, s(2, 2))]).is_err(), "twice");
        assert!(in_order(2, main, vec![(5, s(2, 2))]).is_err(), "out of range");
    }
}
