use std::net::IpAddr;

use super::*;

const SMALL: Limits = Limits {
    handshakes: 4,
    handshakes_per_address: 2,
    connections_per_address: 3,
    operator_sessions: 2,
    peer_sessions: 2,
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn admitted(a: Admission) -> (Ticket, Option<Ticket>) {
    match a {
        Admission::Admitted { ticket, evicted } => (ticket, evicted),
        Admission::Refused(r) => panic!("refused: {r}"),
    }
}

#[test]
fn one_address_cannot_hold_more_than_its_handshakes() {
    let mut b = Budget::new(SMALL);
    let stranger = ip("10.0.0.66");
    admitted(b.admit(stranger));
    admitted(b.admit(stranger));
    for _ in 0..600 {
        assert_eq!(b.admit(stranger), Admission::Refused(Refusal::AddressHandshakes));
    }
    assert_eq!(b.handshakes_in_flight(), 2);
    // Others still get in, without evicting anyone.
    assert_eq!(admitted(b.admit(ip("10.0.0.1"))).1, None);
}

#[test]
fn one_address_cannot_hold_more_than_its_connections() {
    let mut b = Budget::new(SMALL);
    let op = ip("10.0.0.1");
    for _ in 0..2 {
        let (t, _) = admitted(b.admit(op));
        b.authenticated(t, Caller::Operator).expect("session");
    }
    admitted(b.admit(op));
    assert_eq!(b.admit(op), Admission::Refused(Refusal::AddressConnections));
}

#[test]
fn a_full_pool_evicts_the_oldest_handshake_not_the_newcomer() {
    let mut b = Budget::new(SMALL);
    let mut first = Vec::new();
    for i in 1..=4 {
        first.push(admitted(b.admit(ip(&format!("10.0.1.{i}")))).0);
    }
    let (newcomer, evicted) = admitted(b.admit(ip("10.0.0.1")));
    assert_eq!(evicted, Some(first[0]));
    assert_eq!(b.handshakes_in_flight(), 4);
    // The evicted one can no longer authenticate; the newcomer can.
    assert_eq!(b.authenticated(first[0], Caller::Peer), Err(Refusal::Evicted));
    b.authenticated(newcomer, Caller::Operator).expect("newcomer authenticates");
    // Releasing the evicted ticket later changes nothing.
    b.release(first[0]);
    assert_eq!(b.handshakes_in_flight(), 3);
}

#[test]
fn a_burst_from_a_few_addresses_evicts_its_own_handshakes_not_a_lone_callers() {
    let limits = Limits { handshakes: 16, handshakes_per_address: 8, ..SMALL };
    let limits = Limits { connections_per_address: 1000, ..limits };
    let mut b = Budget::new(limits);
    // The operator's handshake is the oldest in the pool.
    let (operator, _) = admitted(b.admit(ip("10.0.0.1")));
    let mut evictions = 0;
    for k in 0..1000u32 {
        match b.admit(IpAddr::from([172, 16, 0, (k % 8) as u8])) {
            Admission::Admitted { evicted, .. } => {
                assert_ne!(evicted, Some(operator), "evicted the operator at arrival {k}");
                evictions += usize::from(evicted.is_some());
            }
            Admission::Refused(r) => assert_eq!(r, Refusal::AddressHandshakes),
        }
    }
    assert!(evictions > 0, "the pool never filled");
    b.authenticated(operator, Caller::Operator).expect("the operator got through");
}

#[test]
fn sessions_have_slots_that_handshakes_never_take() {
    let mut b = Budget::new(SMALL);
    let (op, _) = admitted(b.admit(ip("10.0.0.1")));
    b.authenticated(op, Caller::Operator).expect("operator session");
    let (peer, _) = admitted(b.admit(ip("10.0.0.2")));
    b.authenticated(peer, Caller::Peer).expect("peer session");
    // A flood from many addresses churns through the handshake pool...
    for i in 0..1000u32 {
        let a = IpAddr::from([172, 16, (i / 250) as u8, (i % 250) as u8]);
        let (_, evicted) = admitted(b.admit(a));
        assert_ne!(evicted, Some(op));
        assert_ne!(evicted, Some(peer));
    }
    // ...and never touches the authenticated sessions.
    assert_eq!(b.sessions(Caller::Operator), 1);
    assert_eq!(b.sessions(Caller::Peer), 1);
    assert_eq!(b.handshakes_in_flight(), 4);
}

#[test]
fn sessions_are_capped_per_kind() {
    let mut b = Budget::new(SMALL);
    for i in 1..=2 {
        let (t, _) = admitted(b.admit(ip(&format!("10.0.0.{i}"))));
        b.authenticated(t, Caller::Peer).expect("peer");
    }
    let (third, _) = admitted(b.admit(ip("10.0.0.3")));
    assert_eq!(b.authenticated(third, Caller::Peer), Err(Refusal::Sessions(Caller::Peer)));
    // Peers filling their slots leave the operators' slots alone.
    b.authenticated(third, Caller::Operator).expect("operator slot");
    // A listener with no slots for a kind refuses it outright.
    let mut api = Budget::new(Limits::API);
    let (t, _) = admitted(api.admit(ip("10.0.0.9")));
    assert_eq!(api.authenticated(t, Caller::Peer), Err(Refusal::Sessions(Caller::Peer)));
}

#[test]
fn releasing_gives_the_slots_back() {
    let mut b = Budget::new(SMALL);
    let a = ip("10.0.0.66");
    let (t1, _) = admitted(b.admit(a));
    let (t2, _) = admitted(b.admit(a));
    assert_eq!(b.admit(a), Admission::Refused(Refusal::AddressHandshakes));
    b.release(t1);
    b.release(t1);
    let (t3, _) = admitted(b.admit(a));
    b.authenticated(t2, Caller::Operator).expect("session");
    b.release(t2);
    b.release(t3);
    assert_eq!(b.handshakes_in_flight(), 0);
    assert_eq!(b.sessions(Caller::Operator), 0);
    assert!(b.addresses.is_empty(), "per-address counts leak: {:?}", b.addresses);
}

#[test]
fn an_ipv6_slash_64_counts_as_one_address() {
    let mut b = Budget::new(SMALL);
    admitted(b.admit(ip("2001:db8:1:2::1")));
    admitted(b.admit(ip("2001:db8:1:2:ffff::7")));
    assert_eq!(b.admit(ip("2001:db8:1:2::99")), Admission::Refused(Refusal::AddressHandshakes));
    admitted(b.admit(ip("2001:db8:1:3::1")));
    // An IPv4-mapped address is the IPv4 address.
    assert_eq!(AddressKey::of(ip("::ffff:10.0.0.1")), AddressKey::of(ip("10.0.0.1")));
}

#[test]
fn the_shipped_limits_keep_a_migration_inside_one_address() {
    // A migration opens 1 + 8 streams at once from its source's address.
    for l in [Limits::MIGRATION, Limits::BOTH] {
        assert!(l.handshakes_per_address >= 9 && l.peer_sessions >= 9, "{l:?}");
        assert!(l.handshakes_per_address < l.handshakes, "{l:?}");
    }
    assert_eq!(Limits::API.peer_sessions, 0);
    assert_eq!(Limits::MIGRATION.operator_sessions, 0);
}
