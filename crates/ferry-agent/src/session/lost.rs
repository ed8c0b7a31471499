//! A post-copy whose source half is gone: the source tells the destination,
//! on a new connection, so that the destination releases its frozen half to
//! its operator (it stays as it is: stop it, or keep it for forensics).

use std::sync::Arc;

use ferry_identity::PeerAuthenticated;
use ferry_session::{Event, MigrationState};
use ferry_types::MigrationId;

use super::link;
use super::machine::Session;
use crate::agent::Agent;
use crate::audit::Audit;
use crate::error::Error;
use crate::net::Writer;
use crate::protocol::PeerMessage;
use crate::records::Role;
use crate::report::report;

/// Source: tell the destination once. Ok(true) once it acknowledged (or
/// nothing is left to tell).
pub async fn notify(agent: &Arc<Agent>, id: MigrationId) -> Result<bool, Error> {
    let Some(rec) = agent.records.get(&id)? else { return Ok(true) };
    if rec.role != Role::Source || rec.state() != MigrationState::PostcopyLost || rec.peer_told {
        return Ok(true);
    }
    let to = rec.destination.clone();
    let mut link = link::open(agent, &to).await?;
    let link_err = |source| Error::Link { host: to.clone(), source };
    link.writer
        .write_control(&PeerMessage::PostcopyLost { migration_id: id })
        .await
        .map_err(link_err)?;
    match link.reader.read_control::<PeerMessage>().await.map_err(link_err)? {
        PeerMessage::PostcopyLostAck { migration_id } if migration_id == id => {}
        PeerMessage::Refuse { reason, .. } => return Err(Error::Refused { host: to, reason }),
        other => {
            return Err(Error::Unexpected { host: to, step: "postcopy_lost", got: other.name() })
        }
    }
    let mut session = Session::new(agent.clone(), rec);
    let _ = session.audit(Audit::PostcopyLostSent, None).await;
    session.record_mut().peer_told = true;
    session.save()?;
    Ok(true)
}

/// Destination: the migration's own source says its half is gone.
pub async fn serve(
    agent: &Arc<Agent>,
    peer: &PeerAuthenticated,
    id: MigrationId,
    writer: &mut Writer,
) {
    let refuse = |reason: String| PeerMessage::Refuse { migration_id: id, reason };
    let rec = match agent.records.get(&id) {
        // SECURITY: only the migration's own source may say so.
        Ok(Some(r)) if r.role == Role::Destination && &r.source == peer.host() => r,
        _ => {
            agent.metrics.refused("postcopy_lost");
            let _ = writer
                .write_control(&refuse(format!("no post-copy {id} from {} here", peer.host())))
                .await;
            return;
        }
    };
    let mut session = Session::new(agent.clone(), rec);
    match session.state() {
        MigrationState::PostcopyActive => {
            let _ = session.audit(Audit::PostcopyLostReceived, None).await;
            let note = format!(
                "{} lost its half of the post-copy, and the pages only it held: the VM here is \
                 incomplete and released to the operator (stop it, or keep it for forensics)",
                peer.host()
            );
            if let Err(e) = session.apply(Event::SourceLost, Some(note)).await {
                tracing::error!(error = %report(&e), "cannot record the lost source half");
                return;
            }
        }
        MigrationState::PostcopyLost => {}
        other => {
            let _ = writer
                .write_control(&refuse(format!("migration {id} is {other} here, not a post-copy")))
                .await;
            return;
        }
    }
    let _ = writer.write_control(&PeerMessage::PostcopyLostAck { migration_id: id }).await;
}
