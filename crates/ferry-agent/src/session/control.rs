//! A libvirt migration's daemon-to-daemon control connection, carried both
//! ways on its own mTLS connection from the source, joined to the
//! migration by id. The destination's backend puts libvirt's allowlist
//! between it and its libvirtd; here the bytes only travel.

use std::sync::Arc;
use std::time::Duration;

use ferry_channel::Incoming;
use ferry_identity::PeerAuthenticated;
use ferry_types::{HostName, MigrationId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::link;
use crate::agent::Agent;
use crate::backend::{BackendError, ChannelKind};
use crate::error::Error;
use crate::net::{Reader, Writer};
use crate::protocol::PeerMessage;
use crate::report::report;

const CHUNK: usize = 64 * 1024;
/// libvirt's connection idles for the whole transfer.
const IDLE: Duration = Duration::from_secs(24 * 3600);

/// Source side: carry libvirtd's control connection to the destination.
pub async fn carry(agent: Arc<Agent>, to: HostName, id: MigrationId, local: UnixStream) {
    let carried = async {
        let mut link = link::open(&agent, &to).await?;
        tracing::info!(%id, "carrying libvirt's control connection");
        let join = PeerMessage::ControlJoin { migration_id: id };
        link.writer
            .write_control(&join)
            .await
            .map_err(|source| Error::Link { host: to.clone(), source })?;
        relay(local, link.reader, link.writer, &to).await
    };
    if let Err(e) = carried.await {
        tracing::warn!(error = %report(&e), "libvirt's control connection ended");
    }
}

/// Destination side: a control connection for migration `id`, only from
/// its own source and only once.
pub async fn serve(
    agent: Arc<Agent>,
    peer: PeerAuthenticated,
    id: MigrationId,
    reader: Reader,
    writer: Writer,
) {
    // SECURITY: the registry hands the VM out once, and only to the host the
    // admitted Offer came from; the backend's allowlist judges the rest.
    let Some(vm) = agent.sessions.take_control(&id, peer.host()) else {
        agent.metrics.refused("control_join");
        tracing::warn!(%id, peer = %peer.host(), "control join refused: no such migration waiting for it from this host");
        return;
    };
    tracing::info!(%id, %vm, "libvirt's control connection joined");
    let served = async {
        let local = agent.backend.connect_incoming(&vm, ChannelKind::Control).await?;
        relay(local, reader, writer, peer.host()).await
    };
    if let Err(e) = served.await {
        tracing::warn!(%id, error = %report(&e), "libvirt's control connection ended");
    }
}

fn local_io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::Backend(BackendError::Io { what: what.into(), source })
}

/// Both directions until either ends.
async fn relay(
    local: UnixStream,
    mut reader: Reader,
    mut writer: Writer,
    peer: &HostName,
) -> Result<(), Error> {
    reader.set_timeout(IDLE);
    let link = |source| Error::Link { host: peer.clone(), source };
    let (mut from_local, mut to_local) = local.into_split();
    let out = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from_local
                .read(&mut buf)
                .await
                .map_err(local_io("reading libvirt's control connection"))?;
            if n == 0 {
                return writer.write_data_end().await.map_err(link);
            }
            writer.write_data(&buf[..n]).await.map_err(link)?;
            writer.flush().await.map_err(link)?;
        }
    };
    let back = async {
        loop {
            match reader.read_frame().await.map_err(link)? {
                Incoming::Data(d) => to_local
                    .write_all(d)
                    .await
                    .map_err(local_io("writing libvirt's control connection"))?,
                Incoming::DataEnd => return Ok(()),
                Incoming::Control(_) => {
                    return Err(Error::Mismatch(
                        "a control message inside libvirt's control connection".into(),
                    ))
                }
            }
        }
    };
    tokio::select! {
        r = out => r,
        r = back => r,
    }
}
