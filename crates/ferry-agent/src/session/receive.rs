//! The destination half after the Accept: feed the streams into the VM,
//! take the source's Commit, and let the VM run only with a
//! [`DigestsMatch`](crate::checks::DigestsMatch). Once this host answers
//! Abort (or reports a migration aborted), it never runs that VM.

use ferry_channel::StreamSum;
use ferry_session::{Event, MigrationState};
use tokio::sync::mpsc;

use super::inbound::Inbound;
use super::postcopy_destination::{self, Relayed};
use super::streams;
use super::word::{pass_gate, read_commit, send_receipt};
use crate::backend::ChannelKind;
use crate::error::Error;

use crate::net::{Reader, Writer};

use crate::report::report;

pub async fn run(
    mut inbound: Inbound,
    mut reader: Reader,
    mut writer: Writer,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) {
    let Err(e) = receive(&mut inbound, &mut reader, &mut writer, joins).await else { return };
    let why = report(&e);
    match inbound.session.state() {
        MigrationState::Transferring | MigrationState::Resuming => {
            tracing::warn!(reason = %why, "aborting incoming migration");
            inbound.send_abort(&mut writer, &why).await;
            let event = if e.is_peer_abort() { Event::PeerAborted } else { Event::Failed };
            let event = match (event, inbound.session.state()) {
                (Event::PeerAborted, MigrationState::Resuming) => Event::Failed,
                (event, _) => event,
            };
            let _ = inbound.session.apply(event, Some(why)).await;
        }
        state => tracing::error!(reason = %why, ?state, "incoming migration failed"),
    }
}

async fn receive(
    inbound: &mut Inbound,
    reader: &mut Reader,
    writer: &mut Writer,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) -> Result<(), Error> {
    if inbound.agent().backend.managed() {
        return super::managed::receive(inbound, reader, writer, joins).await;
    }
    let received = if inbound.plan.postcopy() {
        match postcopy_destination::relay(inbound, reader, writer).await? {
            Relayed::Whole(sum) => sum,
            Relayed::TookOver => return Ok(()),
        }
    } else {
        receive_streams(inbound, reader, joins).await?
    };
    let arrived = std::time::Instant::now();
    let rec = inbound.session.record_mut();
    rec.bytes = received.bytes;
    rec.digest = Some(received.digest);
    let commit = read_commit(inbound, reader).await?;
    let agent = inbound.agent().clone();
    let vm = inbound.offer.vm.clone();
    let loaded = agent.backend.wait_loaded(&vm, agent.cfg.migration.commit_timeout()).await;
    let proof = pass_gate(inbound, commit, received, loaded.map_err(|e| report(&e))).await?;
    inbound.session.record_mut().gate_hold_ms = Some(arrived.elapsed().as_millis() as u64);
    agent.backend.open_gate(&vm, proof).await?;
    send_receipt(inbound, writer, received).await
}

/// Feed the main stream (on this connection) and any joined multifd
/// streams into QEMU, main first; return the combined count and digest.
async fn receive_streams(
    inbound: &Inbound,
    reader: &mut Reader,
    joins: Option<mpsc::Receiver<(u8, Reader)>>,
) -> Result<StreamSum, Error> {
    let agent = inbound.agent().clone();
    let (vm, n) = (inbound.offer.vm.clone(), inbound.plan.streams().get());
    let io_timeout = agent.cfg.migration.io_timeout();
    // QEMU 7.2 takes the first connection as the main channel.
    let main = agent.backend.connect_incoming(&vm, ChannelKind::Main).await?;
    let source = inbound.offer.source.clone();
    let joined = joins.map(|rx| {
        let (agent, vm, source) = (agent.clone(), vm.clone(), source.clone());
        tokio::spawn(async move { streams::receive_joined(&agent, &vm, &source, n, rx).await })
    });
    let main_sum = streams::pump_into(reader, main, io_timeout, &source).await;
    let joined = match joined {
        Some(task) => task.await.map_err(|e| Error::Mismatch(format!("stream task: {e}")))??,
        None => Vec::new(),
    };
    let sums = streams::in_order(n, main_sum?, joined)?;
    Ok(streams::combine(&sums))
}
