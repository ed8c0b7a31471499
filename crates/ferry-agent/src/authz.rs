//! Authorization (R3) and admission control: who may move which VM where,
//! and what this host can take. Cedar decides (ferry-policy, default deny);
//! this module builds the requests from what the agent knows and keeps the
//! counters (admission, outgoing rate, per-VM cooldown).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
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

pub struct Authz {
    policy: SharedPolicy,
    files: Vec<PathBuf>,
    entities: PathBuf,
    pub admission: Admission,
    outgoing: RateLimiter,
    cooldown: Duration,
    /// When each VM last arrived here or left: no new move inside the cooldown.
    last_moved: Mutex<HashMap<VmName, Instant>>,
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
        })
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
        if let Ok(mut m) = self.last_moved.lock() {
            m.insert(vm.clone(), Instant::now());
        }
        self.admission.completed(vm, Instant::now());
    }

    /// Destination side, before any VM byte: may the source send this VM
    /// here, may this host receive it (zones, trust, anti-co-location), and
    /// is there room (capacity, concurrency, per-peer rate, cooldown)? The
    /// ticket holds the reservation until the migration ends.
    pub fn authorize_incoming(
        &self,
        offer: &OfferBody,
        residents: Vec<VmDescription>,
        plan: TransferPlan,
        (source_attested, destination_attested): (bool, bool),
    ) -> Result<AdmissionTicket, Refusal> {
        let (source, destination, vm) = (&offer.source, &offer.destination, &offer.vm);
        let used = residents
            .iter()
            .fold((0u64, 0u32), |(m, c), r| (m + u64::from(r.spec.memory_mib), c + r.spec.vcpus));
        let residents = residents
            .into_iter()
            .map(|r| Resident { tenant: r.labels.tenant, security_level: r.labels.security_level })
            .collect();
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
            resident_on_destination: residents,
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
        self.admission
            .try_admit(source, vm, memory, vcpus, used.0, used.1, Instant::now())
            .map_err(|r| Refusal::new("admission", format!("admission control: {r}")))
    }
}
