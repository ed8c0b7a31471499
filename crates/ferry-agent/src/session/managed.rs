//! The destination half of a migration libvirt runs, after the Accept.
//! libvirt's source completes only once the destination QEMU's final
//! return-path message (SHUT) arrives, and libvirt runs the VM here only
//! after that; the backend holds SHUT. So: the stream goes into QEMU while
//! its return path comes back; once QEMU loaded everything this host says
//! `Loaded`; the source ends the stream and signs its Commit; only a
//! [`DigestsMatch`](crate::checks::DigestsMatch) lets SHUT go.

use ferry_channel::{ReceivePump, Received, StreamSum};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use super::inbound::Inbound;
use super::peer_watch::AbortOnDrop;
use super::postcopy_destination::return_path;
use super::streams::{self, inline_control};
use super::word::{pass_gate, read_commit, send_receipt};
use crate::backend::ChannelKind;
use crate::checks;
use crate::error::Error;
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

pub async fn receive(
    inbound: &mut Inbound,
    reader: &mut Reader,
    writer: &mut Writer,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) -> Result<(), Error> {
    let agent = inbound.agent().clone();
    let vm = inbound.offer.vm.clone();
    let source = inbound.offer.source.clone();
    let id = inbound.offer.migration_id;
    let io_timeout = agent.cfg.migration.io_timeout();
    let main = agent.backend.connect_incoming(&vm, ChannelKind::Main).await?;
    // QEMU 7.2 takes the first connection as the main channel: the
    // multifd channels connect only now.
    let n = inbound.plan.streams().get();
    let joined = joins.map(|rx| {
        let (agent, vm, source) = (agent.clone(), vm.clone(), source.clone());
        AbortOnDrop(tokio::spawn(async move {
            streams::receive_joined(&agent, &vm, &source, n, rx).await
        }))
    });
    let (from_qemu, mut to_qemu) = main.into_split();
    let (_back, mut back_rx) = return_path(from_qemu);
    let link = |source| Error::Link { host: inbound.offer.source.clone(), source };

    let (ended_tx, mut ended_rx) = oneshot::channel::<()>();
    let stream_in = &mut *reader;
    let pump = async {
        let mut pump = ReceivePump::new();
        let received = pump.run(stream_in, &mut to_qemu, io_timeout).await;
        let _ = ended_tx.send(());
        match received.map_err(|e| Error::relay(e, &source))? {
            Received::End(sum) => Ok(sum),
            Received::Control(bytes, _) => Err(inline_control(&bytes, &source)),
        }
    };
    // Our side meanwhile: the return path back, and `Loaded` once it is.
    let loaded = agent.backend.wait_loaded(&vm, agent.cfg.migration.max_transfer());
    let talk = async {
        tokio::pin!(loaded);
        let mut loaded_at = None;
        loop {
            tokio::select! {
                Some(chunk) = back_rx.recv() => forward(writer, &chunk).await.map_err(link)?,
                r = &mut loaded, if loaded_at.is_none() => {
                    r?;
                    loaded_at = Some(std::time::Instant::now());
                    writer.write_control(&PeerMessage::Loaded { migration_id: id }).await.map_err(link)?;
                }
                _ = &mut ended_rx => return Ok::<_, Error>(loaded_at),
            }
        }
    };
    let (main_sum, loaded_at): (StreamSum, _) = tokio::try_join!(pump, talk)?;
    let _ = to_qemu.shutdown().await;
    let Some(loaded_at) = loaded_at else {
        return Err(Error::NotLoaded("the source ended the stream before QEMU loaded it".into()));
    };
    // The source ends its multifd streams with the main one.
    let joined = match joined {
        Some(mut task) => {
            (&mut task.0).await.map_err(|e| Error::Mismatch(format!("stream task: {e}")))??
        }
        None => Vec::new(),
    };
    let received = streams::combine(&streams::in_order(n, main_sum, joined)?);
    let rec = inbound.session.record_mut();
    rec.bytes = received.bytes;
    rec.digest = Some(received.digest);
    let commit = read_commit(inbound, reader).await?;
    let proof = pass_gate(inbound, commit, received, Ok(())).await?;
    inbound.session.record_mut().gate_hold_ms = Some(loaded_at.elapsed().as_millis() as u64);
    // The gate lets SHUT go; it must reach the source while libvirt
    // finishes, so the return path keeps flowing until the VM runs here.
    opened(&agent, &vm, proof, writer, &mut back_rx).await?;
    inbound.session.record_mut().qemu_downtime_ms = agent.backend.arrival_downtime(&vm).await;
    send_receipt(inbound, writer, received).await
}

async fn forward(writer: &mut Writer, chunk: &[u8]) -> Result<(), ferry_channel::ChannelError> {
    writer.write_data(chunk).await?;
    writer.flush().await
}

async fn opened(
    agent: &crate::agent::Agent,
    vm: &ferry_types::VmName,
    proof: checks::DigestsMatch,
    writer: &mut Writer,
    back_rx: &mut mpsc::Receiver<Vec<u8>>,
) -> Result<(), Error> {
    let gate = agent.backend.open_gate(vm, proof);
    tokio::pin!(gate);
    loop {
        tokio::select! {
            r = &mut gate => return r.map_err(Error::from),
            Some(chunk) = back_rx.recv() => {
                if let Err(e) = forward(writer, &chunk).await {
                    tracing::warn!(error = %report(&e), "the return path did not reach the source");
                }
            }
        }
    }
}
