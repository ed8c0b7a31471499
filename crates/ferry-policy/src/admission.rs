//! Admission control at the destination, and a rate limiter for the source.
//!
//! Pure bookkeeping: the caller passes the clock (`Instant`) and what the
//! host already uses, so the decisions are deterministic in tests and cost
//! no I/O. A refused offer is refused before any VM byte moves.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_types::{HostName, VmName};
use serde::{Deserialize, Serialize};

/// Limits for incoming migrations. Serde accepts durations as seconds
/// (`30`, `0.5`) or strings with a unit (`"500ms"`, `"30s"`, `"5m"`, `"1h"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Memory the host may give to VMs in total, MiB.
    pub capacity_memory_mib: u64,
    /// vCPUs the host may give to VMs in total.
    pub capacity_vcpus: u32,
    /// Incoming migrations in flight at once.
    pub max_concurrent_incoming: usize,
    /// Migrations admitted from one peer per `per_peer_window`.
    pub per_peer_max: u32,
    #[serde(with = "duration_serde")]
    pub per_peer_window: Duration,
    /// After a VM arrives, how long before it may arrive here again
    /// (against thrashing between hosts).
    #[serde(with = "duration_serde")]
    pub vm_cooldown: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            capacity_memory_mib: 64 * 1024,
            capacity_vcpus: 64,
            max_concurrent_incoming: 4,
            per_peer_max: 10,
            per_peer_window: Duration::from_secs(60),
            vm_cooldown: Duration::from_secs(60),
        }
    }
}

mod duration_serde {
    use std::time::Duration;

    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}ms", d.as_millis()))
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = match Raw::deserialize(d)? {
            Raw::Secs(s) => s,
            Raw::Text(t) => parse(&t).map_err(de::Error::custom)?,
        };
        Duration::try_from_secs_f64(secs).map_err(de::Error::custom)
    }

    fn parse(t: &str) -> Result<f64, String> {
        let t = t.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("duration {t:?}: expected a number with unit ms, s, m or h"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "" | "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("duration {t:?}: unknown unit {other:?} (ms, s, m, h)")),
        };
        Ok(n * scale)
    }
}

/// Which limit refused an offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// Not enough free memory.
    Memory,
    /// Not enough free vCPUs.
    Vcpus,
    /// Too many incoming migrations in flight.
    Concurrency,
    /// Too many migrations from this peer in the window.
    PeerRate,
    /// The VM arrived here too recently.
    Cooldown,
    /// The same VM is already being received.
    AlreadyInFlight,
    /// A [`RateLimiter`] key is over its limit.
    Rate,
}

/// A refused offer: which limit, and a message naming the numbers.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
    /// When asking again can succeed, if that is known (rate and cooldown).
    pub retry_after: Option<Duration>,
}

impl Refusal {
    fn new(kind: RefusalKind, message: String) -> Self {
        Refusal { kind, message, retry_after: None }
    }
}

/// Sliding-window event log per key: exact (no bucket edges to burst
/// across), and small because it holds at most `max` instants per key.
#[derive(Debug, Default)]
struct Window {
    events: HashMap<String, VecDeque<Instant>>,
}

impl Window {
    /// Records an event for `key` if fewer than `max` happened within
    /// `window` before `now`; otherwise says how long until one expires.
    fn try_record(
        &mut self,
        key: &str,
        max: u32,
        window: Duration,
        now: Instant,
    ) -> Result<(), Duration> {
        // Forget keys that have gone quiet so a churn of peers cannot grow
        // the map without bound.
        self.events.retain(|_, q| {
            while q.front().is_some_and(|t| now.saturating_duration_since(*t) >= window) {
                q.pop_front();
            }
            !q.is_empty()
        });
        let q = self.events.entry(key.to_owned()).or_default();
        if q.len() >= max as usize {
            let oldest = q.front().copied().unwrap_or(now);
            return Err(window.saturating_sub(now.saturating_duration_since(oldest)));
        }
        q.push_back(now);
        Ok(())
    }

    /// Puts back an event counted before a restart (from durable records):
    /// counted whatever the limit, kept in time order, and only the newest
    /// `max` kept, which refuses exactly as the full history would.
    fn restore(&mut self, key: &str, max: u32, at: Instant) {
        let q = self.events.entry(key.to_owned()).or_default();
        let pos = q.iter().position(|t| *t > at).unwrap_or(q.len());
        q.insert(pos, at);
        while q.len() > max as usize {
            q.pop_front();
        }
    }
}

/// Lock that survives poisoning: every critical section below updates the
/// state with plain assignments that cannot panic half-way, so the data
/// behind a poisoned lock is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
struct Reservation {
    vm: VmName,
    memory_mib: u64,
    vcpus: u32,
}

#[derive(Debug, Default)]
struct State {
    next_ticket: u64,
    in_flight: HashMap<u64, Reservation>,
    reserved_memory_mib: u64,
    reserved_vcpus: u64,
    in_flight_vms: HashSet<VmName>,
    peers: Window,
    cooldown_until: HashMap<VmName, Instant>,
}

/// Destination admission control. Cheap to share: clone the `Arc` inside by
/// cloning the `Admission`.
#[derive(Clone, Debug)]
pub struct Admission {
    cfg: Arc<AdmissionConfig>,
    state: Arc<Mutex<State>>,
}

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Admission { cfg: Arc::new(cfg), state: Arc::new(Mutex::new(State::default())) }
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.cfg
    }

    /// Admits an incoming migration or says which limit refuses it.
    /// Capacity counts what running VMs use (`used_*`), what in-flight
    /// migrations have reserved, and this VM. All checks and the reservation
    /// happen under one lock, so concurrent offers cannot both take the
    /// last slot.
    #[allow(clippy::too_many_arguments)] // the shape the agent calls; all plain numbers
    pub fn try_admit(
        &self,
        peer: &HostName,
        vm: &VmName,
        memory_mib: u64,
        vcpus: u32,
        used_memory_mib: u64,
        used_vcpus: u32,
        now: Instant,
    ) -> Result<AdmissionTicket, Refusal> {
        let cfg = &*self.cfg;
        let mut st = lock(&self.state);

        st.cooldown_until.retain(|_, until| *until > now);
        if let Some(until) = st.cooldown_until.get(vm) {
            let left = until.saturating_duration_since(now);
            return Err(Refusal {
                kind: RefusalKind::Cooldown,
                message: format!(
                    "VM `{vm}` arrived here recently: cooldown {} s, {:.1} s left",
                    cfg.vm_cooldown.as_secs_f64(),
                    left.as_secs_f64()
                ),
                retry_after: Some(left),
            });
        }
        if st.in_flight_vms.contains(vm) {
            return Err(Refusal::new(
                RefusalKind::AlreadyInFlight,
                format!("VM `{vm}` is already being received"),
            ));
        }
        if st.in_flight.len() >= cfg.max_concurrent_incoming {
            return Err(Refusal::new(
                RefusalKind::Concurrency,
                format!(
                    "{} incoming migrations in flight, limit {}",
                    st.in_flight.len(),
                    cfg.max_concurrent_incoming
                ),
            ));
        }

        let memory_needed =
            used_memory_mib.saturating_add(st.reserved_memory_mib).saturating_add(memory_mib);
        if memory_needed > cfg.capacity_memory_mib {
            return Err(Refusal::new(
                RefusalKind::Memory,
                format!(
                    "VM `{vm}` needs {memory_mib} MiB; {used_memory_mib} MiB used by running VMs + {} MiB reserved by {} in-flight migration(s) leaves {} MiB of {} MiB",
                    st.reserved_memory_mib,
                    st.in_flight.len(),
                    cfg.capacity_memory_mib
                        .saturating_sub(used_memory_mib.saturating_add(st.reserved_memory_mib)),
                    cfg.capacity_memory_mib
                ),
            ));
        }
        let vcpus_needed = u64::from(used_vcpus)
            .saturating_add(st.reserved_vcpus)
            .saturating_add(u64::from(vcpus));
        if vcpus_needed > u64::from(cfg.capacity_vcpus) {
            return Err(Refusal::new(
                RefusalKind::Vcpus,
                format!(
                    "VM `{vm}` needs {vcpus} vCPUs; {used_vcpus} used by running VMs + {} reserved by {} in-flight migration(s) leaves {} of {}",
                    st.reserved_vcpus,
                    st.in_flight.len(),
                    u64::from(cfg.capacity_vcpus)
                        .saturating_sub(u64::from(used_vcpus).saturating_add(st.reserved_vcpus)),
                    cfg.capacity_vcpus
                ),
            ));
        }
        // Rate last: only an offer that would otherwise be admitted uses up
        // the peer's allowance.
        if let Err(wait) =
            st.peers.try_record(peer.as_str(), cfg.per_peer_max, cfg.per_peer_window, now)
        {
            return Err(Refusal {
                kind: RefusalKind::PeerRate,
                message: format!(
                    "peer `{peer}` already had {} migration(s) admitted in the last {} s (limit {}); retry in {:.1} s",
                    cfg.per_peer_max,
                    cfg.per_peer_window.as_secs_f64(),
                    cfg.per_peer_max,
                    wait.as_secs_f64()
                ),
                retry_after: Some(wait),
            });
        }

        let id = st.next_ticket;
        st.next_ticket = st.next_ticket.wrapping_add(1);
        st.reserved_memory_mib = st.reserved_memory_mib.saturating_add(memory_mib);
        st.reserved_vcpus = st.reserved_vcpus.saturating_add(u64::from(vcpus));
        st.in_flight_vms.insert(vm.clone());
        st.in_flight.insert(id, Reservation { vm: vm.clone(), memory_mib, vcpus });
        Ok(AdmissionTicket { id, vm: vm.clone(), state: Arc::clone(&self.state) })
    }

    /// A migration of `vm` into this host finished at `at` (now, or a past
    /// instant rebuilt from records after a restart): start its cooldown.
    /// A later cooldown already running is kept.
    pub fn completed(&self, vm: &VmName, at: Instant) {
        let until = at + self.cfg.vm_cooldown;
        let mut st = lock(&self.state);
        let entry = st.cooldown_until.entry(vm.clone()).or_insert(until);
        *entry = (*entry).max(until);
    }

    /// An offer from `peer` admitted at `at`, before this agent restarted:
    /// it counts against the peer's rate window again.
    pub fn restore_peer_admission(&self, peer: &HostName, at: Instant) {
        lock(&self.state).peers.restore(peer.as_str(), self.cfg.per_peer_max, at);
    }

    /// Incoming migrations in flight and what they reserve (MiB, vCPUs).
    pub fn in_flight(&self) -> (usize, u64, u64) {
        let st = lock(&self.state);
        (st.in_flight.len(), st.reserved_memory_mib, st.reserved_vcpus)
    }
}

/// Holds a reservation (memory, vCPUs, a concurrency slot) for one incoming
/// migration; dropping it releases them, so an aborted or panicking
/// migration task cannot leak capacity.
pub struct AdmissionTicket {
    id: u64,
    vm: VmName,
    state: Arc<Mutex<State>>,
}

impl AdmissionTicket {
    pub fn vm(&self) -> &VmName {
        &self.vm
    }
}

impl fmt::Debug for AdmissionTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionTicket").field("id", &self.id).field("vm", &self.vm).finish()
    }
}

impl Drop for AdmissionTicket {
    fn drop(&mut self) {
        let mut st = lock(&self.state);
        if let Some(r) = st.in_flight.remove(&self.id) {
            st.reserved_memory_mib = st.reserved_memory_mib.saturating_sub(r.memory_mib);
            st.reserved_vcpus = st.reserved_vcpus.saturating_sub(u64::from(r.vcpus));
            st.in_flight_vms.remove(&r.vm);
        }
    }
}

/// Sliding-window rate limit per key, e.g. outgoing migrations per
/// destination or per operator on the source.
#[derive(Debug)]
pub struct RateLimiter {
    max: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl RateLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        RateLimiter { max, window, state: Mutex::new(Window::default()) }
    }

    /// Counts an event for `key`, or refuses it if `max` already happened in
    /// the window before `now`. Refused events are not counted, so a caller
    /// that backs off gets through once the window moves on.
    pub fn check(&self, key: &str, now: Instant) -> Result<(), Refusal> {
        lock(&self.state).try_record(key, self.max, self.window, now).map_err(|wait| Refusal {
            kind: RefusalKind::Rate,
            message: format!(
                "`{key}`: {} request(s) in the last {} s, limit {}; retry in {:.1} s",
                self.max,
                self.window.as_secs_f64(),
                self.max,
                wait.as_secs_f64()
            ),
            retry_after: Some(wait),
        })
    }

    /// An event for `key` counted at `at`, before this process restarted.
    pub fn restore(&self, key: &str, at: Instant) {
        lock(&self.state).restore(key, self.max, at);
    }

    /// How long an event stays in the window.
    pub fn window(&self) -> Duration {
        self.window
    }
}
