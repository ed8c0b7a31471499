//! The connection budget of one listener: which new connection gets a slot,
//! which is refused, and which handshake is evicted to make room. Pure: the
//! server asks, acts on the answer, and tells the budget when a connection
//! authenticates or ends.
//!
//! SECURITY: what a stranger (no certificate yet) can hold is bounded three
//! ways: per address (handshakes and connections), in total (handshakes),
//! and in time (the server's handshake deadline). Authenticated sessions
//! have slots of their own, per kind of caller, that handshakes never take,
//! so a flood of strangers cannot starve an operator or a peer who already
//! got in. When every handshake slot is taken, a new connection evicts a
//! handshake instead of being refused: the oldest one of the address with
//! the most handshakes in flight. A flood from a few addresses then churns
//! through its own handshakes, and a lone operator's or peer's handshake
//! (milliseconds) survives it.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;

/// What one listener allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Handshakes in flight from all addresses.
    pub handshakes: usize,
    /// Handshakes in flight from one address.
    pub handshakes_per_address: usize,
    /// Connections (handshaking or authenticated) from one address.
    pub connections_per_address: usize,
    /// Authenticated operator sessions.
    pub operator_sessions: usize,
    /// Authenticated peer sessions (offers, streams, resolves).
    pub peer_sessions: usize,
}

impl Limits {
    /// The operator API listener: operators only.
    pub const API: Limits = Limits {
        handshakes: 64,
        handshakes_per_address: 8,
        connections_per_address: 32,
        operator_sessions: 64,
        peer_sessions: 0,
    };
    /// The migration listener: known peers only. A migration opens up to
    /// 9 streams at once, and a host may run several.
    pub const MIGRATION: Limits = Limits {
        handshakes: 64,
        handshakes_per_address: 16,
        connections_per_address: 128,
        operator_sessions: 0,
        peer_sessions: 256,
    };
    /// One listener for both (the single-address default).
    pub const BOTH: Limits = Limits {
        handshakes: 128,
        handshakes_per_address: 16,
        connections_per_address: 160,
        operator_sessions: 64,
        peer_sessions: 256,
    };
}

/// Who a connection turned out to be, once authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Operator,
    Peer,
}

/// Why a connection got no slot. Each is counted under its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many handshakes in flight from this address")]
    AddressHandshakes,
    #[error("too many connections from this address")]
    AddressConnections,
    #[error("every {0:?} session slot is taken")]
    Sessions(Caller),
    #[error("evicted to make room for a newer handshake")]
    Evicted,
}

impl Refusal {
    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::AddressHandshakes => "address_handshakes",
            Refusal::AddressConnections => "address_connections",
            Refusal::Sessions(Caller::Operator) => "operator_sessions",
            Refusal::Sessions(Caller::Peer) => "peer_sessions",
            Refusal::Evicted => "handshake_evicted",
        }
    }
}

/// One admitted connection's claim on the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(u64);

/// The answer to a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead with the handshake; if `evicted` is set, that handshake
    /// lost its slot and must be closed now.
    Admitted {
        ticket: Ticket,
        evicted: Option<Ticket>,
    },
    Refused(Refusal),
}

/// Addresses that count as one: an IPv4 address, or an IPv6 /64 (one
/// customer or host usually owns a whole /64, so per-address limits on
/// single IPv6 addresses would limit nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn of(addr: IpAddr) -> AddressKey {
        match addr {
            IpAddr::V4(v4) => AddressKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    AddressKey(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Handshake,
    Session(Caller),
}

#[derive(Debug, Default, Clone, Copy)]
struct PerAddress {
    handshakes: usize,
    connections: usize,
}

#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    next: u64,
    /// Handshakes in flight, oldest first.
    handshakes: VecDeque<Ticket>,
    held: BTreeMap<Ticket, (AddressKey, Held)>,
    addresses: BTreeMap<AddressKey, PerAddress>,
    operator_sessions: usize,
    peer_sessions: usize,
}

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            next: 0,
            handshakes: VecDeque::new(),
            held: BTreeMap::new(),
            addresses: BTreeMap::new(),
            operator_sessions: 0,
            peer_sessions: 0,
        }
    }

    /// A new connection from `addr`, before any TLS work.
    pub fn admit(&mut self, addr: IpAddr) -> Admission {
        let key = AddressKey::of(addr);
        let mine = self.addresses.get(&key).copied().unwrap_or_default();
        if mine.handshakes >= self.limits.handshakes_per_address {
            return Admission::Refused(Refusal::AddressHandshakes);
        }
        if mine.connections >= self.limits.connections_per_address {
            return Admission::Refused(Refusal::AddressConnections);
        }
        let evicted = if self.handshakes.len() >= self.limits.handshakes {
            let victim = self.eviction_victim();
            if let Some(t) = victim {
                self.release(t);
            }
            victim
        } else {
            None
        };
        let ticket = Ticket(self.next);
        self.next += 1;
        self.handshakes.push_back(ticket);
        self.held.insert(ticket, (key, Held::Handshake));
        let a = self.addresses.entry(key).or_default();
        a.handshakes += 1;
        a.connections += 1;
        Admission::Admitted { ticket, evicted }
    }

    /// The oldest handshake of the address that holds the most handshakes.
    /// A burst from a few addresses then evicts its own handshakes, never a
    /// lone caller's; to evict that one, a flood needs more addresses than
    /// the pool has slots, each with as few handshakes in flight.
    fn eviction_victim(&self) -> Option<Ticket> {
        let most = self.addresses.values().map(|a| a.handshakes).max()?;
        self.handshakes.iter().copied().find(|t| {
            self.held
                .get(t)
                .and_then(|(key, _)| self.addresses.get(key))
                .is_some_and(|a| a.handshakes == most)
        })
    }

    /// The handshake of `ticket` proved who the caller is: it moves to a
    /// session slot of that kind, or is refused if there is none left (or
    /// if it was evicted meanwhile). On refusal the ticket still holds its
    /// handshake slot until released.
    pub fn authenticated(&mut self, ticket: Ticket, caller: Caller) -> Result<(), Refusal> {
        let Some((key, held)) = self.held.get(&ticket).copied() else {
            return Err(Refusal::Evicted);
        };
        if held != Held::Handshake {
            return Ok(());
        }
        let (used, cap) = match caller {
            Caller::Operator => (&mut self.operator_sessions, self.limits.operator_sessions),
            Caller::Peer => (&mut self.peer_sessions, self.limits.peer_sessions),
        };
        if *used >= cap {
            return Err(Refusal::Sessions(caller));
        }
        *used += 1;
        self.handshakes.retain(|t| *t != ticket);
        self.held.insert(ticket, (key, Held::Session(caller)));
        if let Some(a) = self.addresses.get_mut(&key) {
            a.handshakes -= 1;
        }
        Ok(())
    }

    /// The connection of `ticket` ended (or was evicted). Releasing twice
    /// is harmless.
    pub fn release(&mut self, ticket: Ticket) {
        let Some((key, held)) = self.held.remove(&ticket) else { return };
        match held {
            Held::Handshake => self.handshakes.retain(|t| *t != ticket),
            Held::Session(Caller::Operator) => self.operator_sessions -= 1,
            Held::Session(Caller::Peer) => self.peer_sessions -= 1,
        }
        if let Some(a) = self.addresses.get_mut(&key) {
            if held == Held::Handshake {
                a.handshakes -= 1;
            }
            a.connections -= 1;
            if a.connections == 0 {
                self.addresses.remove(&key);
            }
        }
    }

    /// Handshakes in flight, for tests and diagnostics.
    pub fn handshakes_in_flight(&self) -> usize {
        self.handshakes.len()
    }

    /// Authenticated sessions of one kind.
    pub fn sessions(&self, caller: Caller) -> usize {
        match caller {
            Caller::Operator => self.operator_sessions,
            Caller::Peer => self.peer_sessions,
        }
    }
}

#[cfg(test)]
#[path = "budget_tests.rs"]
mod tests;
