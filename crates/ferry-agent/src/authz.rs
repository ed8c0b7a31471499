//! Authorization (R3) and admission control: who may move which VM where,
//! and what this host can take. Cedar decides (ferry-policy, default deny);
//! this module builds the requests from what the agent knows (including the
//! VMs already here, for co-location) and keeps the counters (admission,
//! outgoing rate, per-VM cooldown), which survive restarts ([`history`]).

mod history;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_policy::{
    Action, Admission, AdmissionTicket, Decision, Principal, RateLimiter, Request, Resident,
    SharedPolicy, VmLabels,
};
use ferry_types::{HostName, OperatorName, VmName};

use crate::backend::VmDescription;
use crate::checks::Refusal;
use crate::config::AgentConfig;
use crate::error::Error;
use crate::evidence::OfferBody;
use crate::plan::TransferPlan;
use crate::records::{now_unix_ms, RecordError, RecordStore};

/// Labels of admitted incoming VMs whose QEMU may not be in the VM table yet.
type Arriving = Arc<Mutex<HashMap<VmName, VmLabels>>>;

pub struct Authz {
    policy: SharedPolicy,
    files: Vec<PathBuf>,
    entities: PathBuf,
    pub admission: Admission,
    outgoing: RateLimiter,
    cooldown: Duration,
    /// When each VM last arrived here or left: no new move inside the cooldown.
    last_moved: Mutex<HashMap<VmName, Instant>>,
    arriving: Arriving,
}

/// An admitted incoming VM. Holds its admission reservation and, until the
/// migration ends, makes the VM a resident for co-location decisions: its
/// QEMU is launched after the VM table lock is released, and a VM that is
/// about to run here must protect (and be protected) like one that runs.
pub struct Arrival {
    _ticket: AdmissionTicket,
    vm: VmName,
    arriving: Arriving,
}

impl Drop for Arrival {
    fn drop(&mut self) {
        // Only plain map updates happen under this lock, so a poisoned lock
        // still holds a consistent map.
        let mut m = self.arriving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.remove(&self.vm);
    }
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn deny_reason(d: &Decision) -> Option<String> {
    match d {
        Decision::Allow { .. } => None,
        Decision::Deny { reason, .. } => Some(reason.clone()),
    }
}

impl Authz {
    pub fn load(cfg: &AgentConfig) -> Result<Self, ferry_policy::PolicyError> {
        let engine = ferry_policy::PolicyEngine::load(&cfg.policy.files, &cfg.policy.entities)?;
        for w in engine.warnings() {
            tracing::warn!(warning = %w, "policy validation warning");
        }
        Ok(Self {
            policy: SharedPolicy::new(engine),
            files: cfg.policy.files.clone(),
            entities: cfg.policy.entities.clone(),
            admission: Admission::new(cfg.admission.clone()),
            outgoing: RateLimiter::new(
                cfg.migration.outgoing_max,
                Duration::from_millis(cfg.migration.outgoing_window_ms),
            ),
            cooldown: cfg.admission.vm_cooldown,
            last_moved: Mutex::new(HashMap::new()),
            arriving: Arc::default(),
        })
    }

    /// Rebuilds the cooldowns and rate windows from the durable migration
    /// records, so a restart does not reset them. Called once at start-up.
    pub fn restore(&self, records: &RecordStore) -> Result<(), RecordError> {
        let horizons = history::Horizons {
            cooldown: self.cooldown,
            outgoing_window: self.outgoing.window(),
            per_peer_window: self.admission.config().per_peer_window,
        };
        let (now, now_ms) = (Instant::now(), now_unix_ms());
        let past = history::history(&records.all()?, now_ms, horizons);
        // Wall-clock times become instants on this process's clock. One that
        // cannot be represented is taken as now: the limit lasts longer.
        let at = |t: u64| {
            now.checked_sub(Duration::from_millis(now_ms.saturating_sub(t))).unwrap_or(now)
        };
        for (vm, t) in &past.moves {
            self.moved_at(vm, at(*t));
        }
        for (destination, t) in &past.outgoing {
            self.outgoing.restore(destination.as_str(), at(*t));
        }
        for (source, t) in &past.incoming {
            self.admission.restore_peer_admission(source, at(*t));
        }
        tracing::info!(
            cooldowns = past.moves.len(),
            outgoing = past.outgoing.len(),
            incoming = past.incoming.len(),
            "admission limits rebuilt from migration records"
        );
        Ok(())
    }

    /// The VMs on this host as co-location policy sees them: those the
    /// backend runs (running, arriving or leaving) and admitted arrivals
    /// whose VM is still being launched. Call under the agent's admission
    /// lock, so the decision and the launch it allows see one picture.
    pub fn residents(&self, vms: &[VmDescription]) -> Vec<Resident> {
        let arriving = self.arriving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let launched = vms.iter().map(|d| (&d.spec.name, &d.labels));
        let launching = arriving.iter().filter(|(vm, _)| !vms.iter().any(|d| &d.spec.name == *vm));
        launched
            .chain(launching)
            .map(|(name, labels)| Resident { name: name.clone(), labels: labels.clone() })
            .collect()
    }

    /// Re-read the policy files atomically: on any error the old policy
    /// stays in force and the error (file:line:col) is returned.
    pub fn reload(&self) -> Result<usize, ferry_policy::PolicyError> {
        self.policy.reload(&self.files, &self.entities)?;
        Ok(self.policy.current().policies().len())
    }

    fn decide(&self, req: &Request) -> Decision {
        self.policy.current().authorize(req)
    }

    /// Source side, before anything else: may this operator move this VM
    /// there, may this host send it there, and do the rate limit and the
    /// VM's cooldown allow another move now?
    #[allow(clippy::too_many_arguments)]
    pub fn authorize_outgoing(
        &self,
        operator: &OperatorName,
        role: &str,
        vm: &VmName,
        labels: &VmLabels,
        source: &HostName,
        destination: &HostName,
        postcopy: bool,
        attestation_on: bool,
    ) -> Result<Vec<String>, Error> {
        // With attestation on, this host refuses any destination whose quote
        // does not verify, before a VM byte moves: both platforms will be
        // attested, or the migration does not happen.
        let mut req = Request {
            principal: Principal::Operator { name: operator.clone(), role: role.to_owned() },
            action: Action::MigrateVm,
            vm: vm.clone(),
            labels: labels.clone(),
            source: source.clone(),
            destination: destination.clone(),
            postcopy,
            source_attested: attestation_on,
            destination_attested: attestation_on,
            now_unix: now_unix(),
            resident_on_destination: Vec::new(),
        };
        let d = self.decide(&req);
        if let Some(reason) = deny_reason(&d) {
            return Err(Error::Denied(format!(
                "policy denies {operator} migrating {vm} to {destination}: {reason}"
            )));
        }
        let mut policies = d.policies().to_vec();
        req.principal = Principal::Host { name: source.clone() };
        req.action = Action::SendVm;
        let d = self.decide(&req);
        if let Some(reason) = deny_reason(&d) {
            return Err(Error::Denied(format!(
                "policy denies {source} sending {vm} to {destination}: {reason}"
            )));
        }
        policies.extend(d.policies().iter().cloned());
        self.check_cooldown(vm).map_err(Error::Denied)?;
        self.outgoing
            .check(destination.as_str(), Instant::now())
            .map_err(|r| Error::Denied(format!("outgoing migration rate limit: {r}")))?;
        Ok(policies)
    }

    fn check_cooldown(&self, vm: &VmName) -> Result<(), String> {
        let last = self.last_moved.lock().ok().and_then(|m| m.get(vm).copied());
        if let Some(t) = last {
            let since = t.elapsed();
            if since < self.cooldown {
                return Err(format!(
                    "VM {vm} moved {:.1} s ago; its cooldown is {:.0} s (retry in {:.1} s)",
                    since.as_secs_f64(),
                    self.cooldown.as_secs_f64(),
                    (self.cooldown - since).as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// A VM arrived here or left: start its cooldown.
    pub fn moved(&self, vm: &VmName) {
        self.moved_at(vm, Instant::now());
    }

    fn moved_at(&self, vm: &VmName, at: Instant) {
        if let Ok(mut m) = self.last_moved.lock() {
            let last = m.entry(vm.clone()).or_insert(at);
            *last = (*last).max(at);
        }
        self.admission.completed(vm, at);
    }

    /// `ferry vm start`: may this host place this new VM next to the VMs it
    /// already has (co-location, both directions)? Which operators may start
    /// VMs at all is the agent's operator_roles, checked before this.
    pub fn authorize_start(
        &self,
        host: &HostName,
        vm: &VmName,
        labels: &VmLabels,
        residents: Vec<Resident>,
        attestation_on: bool,
    ) -> Result<Vec<String>, Error> {
        let req = Request {
            principal: Principal::Host { name: host.clone() },
            action: Action::StartVm,
            vm: vm.clone(),
            labels: labels.clone(),
            source: host.clone(),
            destination: host.clone(),
            postcopy: false,
            // Nothing crosses to another platform; policy sees whether this
            // host is under attestation at all.
            source_attested: attestation_on,
            destination_attested: attestation_on,
            now_unix: now_unix(),
            resident_on_destination: residents,
        };
        let d = self.decide(&req);
        match deny_reason(&d) {
            Some(reason) => {
                Err(Error::Denied(format!("policy denies starting {vm} on {host}: {reason}")))
            }
            None => Ok(d.policies().to_vec()),
        }
    }

    /// Destination side, before any VM byte: may the source send this VM
    /// here, may this host receive it (zones, trust, co-location with the
    /// VMs here), and is there room (capacity, concurrency, per-peer rate,
    /// cooldown)? The arrival holds the reservation until the migration ends.
    pub fn authorize_incoming(
        &self,
        offer: &OfferBody,
        here: Vec<VmDescription>,
        plan: TransferPlan,
        (source_attested, destination_attested): (bool, bool),
    ) -> Result<Arrival, Refusal> {
        let (source, destination, vm) = (&offer.source, &offer.destination, &offer.vm);
        let used = here
            .iter()
            .fold((0u64, 0u32), |(m, c), r| (m + u64::from(r.spec.memory_mib), c + r.spec.vcpus));
        let mut req = Request {
            principal: Principal::Host { name: source.clone() },
            action: Action::SendVm,
            vm: vm.clone(),
            labels: offer.labels.clone(),
            source: source.clone(),
            destination: destination.clone(),
            postcopy: plan.postcopy(),
            source_attested,
            destination_attested,
            now_unix: now_unix(),
            resident_on_destination: self.residents(&here),
        };
        if let Some(reason) = deny_reason(&self.decide(&req)) {
            let why = format!("policy denies {source} sending {vm} here: {reason}");
            return Err(Refusal::new("policy", why));
        }
        req.principal = Principal::Host { name: destination.clone() };
        req.action = Action::ReceiveVm;
        if let Some(reason) = deny_reason(&self.decide(&req)) {
            let why = format!("policy denies {destination} receiving {vm}: {reason}");
            return Err(Refusal::new("policy", why));
        }
        self.check_cooldown(vm).map_err(|why| Refusal::new("cooldown", why))?;
        let (memory, vcpus) = (u64::from(offer.spec.memory_mib), offer.spec.vcpus);
        let ticket = self
            .admission
            .try_admit(source, vm, memory, vcpus, used.0, used.1, Instant::now())
            .map_err(|r| Refusal::new("admission", format!("admission control: {r}")))?;
        // SECURITY (C6): from here on the VM is a resident for every other
        // decision; the ticket admits one migration per VM name at a time,
        // so no other arrival owns this entry.
        let mut arriving = self.arriving.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        arriving.insert(vm.clone(), offer.labels.clone());
        Ok(Arrival { _ticket: ticket, vm: vm.clone(), arriving: Arc::clone(&self.arriving) })
    }
}

#[cfg(test)]
mod tests;
