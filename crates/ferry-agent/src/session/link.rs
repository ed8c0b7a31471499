//! A source's connection to its destination for one migration: TCP, TLS
//! 1.3 with both certificates, the destination's name checked, the greeting.

use std::net::SocketAddr;

use ferry_identity::PeerAuthenticated;
use ferry_types::HostName;

use crate::agent::Agent;
use crate::error::Error;
use crate::net::{Reader, Writer};

/// A greeted connection to a peer agent, and the proof of who it is.
pub struct Link {
    pub peer: PeerAuthenticated,
    pub reader: Reader,
    pub writer: Writer,
}

/// Where the `[peers]` table says `to` is.
pub fn address(agent: &Agent, to: &HostName) -> Result<SocketAddr, Error> {
    agent.cfg.peers.get(to).copied().ok_or_else(|| Error::UnknownPeer(to.clone()))
}

pub async fn open(agent: &Agent, to: &HostName) -> Result<Link, Error> {
    let addr = address(agent, to)?;
    let mig = &agent.cfg.migration;
    let config = agent.tls.client().map_err(Error::Tls)?;
    // Peers accept migration connections only from the addresses in their
    // [peers] tables: leave from ours.
    let from = agent.cfg.migration_source().map_err(Error::MigrationAddress)?;
    let limit = mig.unsent_limit();
    let timeout = mig.connect_timeout();
    let (stream, peer) =
        crate::net::connect(addr, from, limit, to, config, &agent.domain, timeout).await?;
    let (reader, writer) = crate::net::greet(stream, to, addr, mig.io_timeout()).await?;
    Ok(Link { peer, reader, writer })
}
