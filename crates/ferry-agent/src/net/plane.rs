//! The two planes an agent serves: operators on the API listener, peer
//! agents on the migration listener (or both on one listener, the
//! single-address default). Pure decisions about who may use which.

use std::collections::BTreeSet;
use std::net::IpAddr;

use super::budget::{Caller, Limits};

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plane {
    /// Operators only.
    Api,
    /// Peer agents only, from the addresses in the `[peers]` table.
    Migration,
    /// Both (one address for everything).
    Both,
}

/// Why a caller was refused by the listener it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlaneRefusal {
    #[error("not the address of any host in [peers]; the migration listener serves only peers")]
    NotAPeerAddress,
    #[error("a peer agent on the operator API listener; peers use the migration listener")]
    PeerOnApiListener,
    #[error("an operator on the migration listener; operators use the API listener")]
    OperatorOnMigrationListener,
}

impl PlaneRefusal {
    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            PlaneRefusal::NotAPeerAddress => "not_a_peer_address",
            PlaneRefusal::PeerOnApiListener => "peer_on_api_listener",
            PlaneRefusal::OperatorOnMigrationListener => "operator_on_migration_listener",
        }
    }
}

/// The source addresses of the hosts in `[peers]`. Peers bind their side of
/// every connection to their migration address, which is the address this
/// host's `[peers]` table names, so that is where they come from.
#[derive(Debug, Clone, Default)]
pub struct PeerAddresses(BTreeSet<IpAddr>);

impl PeerAddresses {
    pub fn new(addrs: impl IntoIterator<Item = IpAddr>) -> PeerAddresses {
        PeerAddresses(addrs.into_iter().map(canonical).collect())
    }
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&canonical(addr))
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address (a dual-stack listener
/// sees IPv4 callers that way).
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

impl Plane {
    pub fn name(self) -> &'static str {
        match self {
            Plane::Api => "api",
            Plane::Migration => "migration",
            Plane::Both => "api+migration",
        }
    }

    pub fn limits(self) -> Limits {
        match self {
            Plane::Api => Limits::API,
            Plane::Migration => Limits::MIGRATION,
            Plane::Both => Limits::BOTH,
        }
    }

    /// Before any TLS work: may a connection from `addr` proceed?
    ///
    /// SECURITY: on the migration listener a stranger costs one accept and
    /// one close; it never reaches rustls. Source addresses of TCP
    /// connections cannot be spoofed without the return path, so this is
    /// a real filter (the certificate check that follows is still the
    /// authentication).
    pub fn admits_address(self, addr: IpAddr, peers: &PeerAddresses) -> Result<(), PlaneRefusal> {
        match self {
            Plane::Migration if !peers.contains(addr) => Err(PlaneRefusal::NotAPeerAddress),
            _ => Ok(()),
        }
    }

    /// After the handshake: may this kind of caller use this listener?
    pub fn admits_caller(self, caller: Caller) -> Result<(), PlaneRefusal> {
        match (self, caller) {
            (Plane::Api, Caller::Peer) => Err(PlaneRefusal::PeerOnApiListener),
            (Plane::Migration, Caller::Operator) => Err(PlaneRefusal::OperatorOnMigrationListener),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn the_migration_listener_admits_only_peer_addresses() {
        let peers = PeerAddresses::new([ip("10.1.0.2"), ip("10.1.0.3")]);
        assert_eq!(Plane::Migration.admits_address(ip("10.1.0.2"), &peers), Ok(()));
        assert_eq!(Plane::Migration.admits_address(ip("::ffff:10.1.0.3"), &peers), Ok(()));
        assert_eq!(
            Plane::Migration.admits_address(ip("10.1.0.66"), &peers),
            Err(PlaneRefusal::NotAPeerAddress)
        );
        // With no peers at all, nobody gets in.
        let none = PeerAddresses::default();
        assert!(Plane::Migration.admits_address(ip("10.1.0.2"), &none).is_err());
        // Operators come from anywhere: the API and shared listeners do not filter.
        assert_eq!(Plane::Api.admits_address(ip("10.1.0.66"), &peers), Ok(()));
        assert_eq!(Plane::Both.admits_address(ip("10.1.0.66"), &peers), Ok(()));
    }

    #[test]
    fn each_listener_serves_only_its_kind_of_caller() {
        assert_eq!(Plane::Api.admits_caller(Caller::Operator), Ok(()));
        assert_eq!(Plane::Api.admits_caller(Caller::Peer), Err(PlaneRefusal::PeerOnApiListener));
        assert_eq!(Plane::Migration.admits_caller(Caller::Peer), Ok(()));
        assert_eq!(
            Plane::Migration.admits_caller(Caller::Operator),
            Err(PlaneRefusal::OperatorOnMigrationListener)
        );
        assert_eq!(Plane::Both.admits_caller(Caller::Peer), Ok(()));
        assert_eq!(Plane::Both.admits_caller(Caller::Operator), Ok(()));
    }
}
