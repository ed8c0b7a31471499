//! The request and decision vocabulary shared by the agent, the CLI and the
//! Cedar engine. Plain data: nothing here knows about Cedar.

use ferry_types::{HostName, OperatorName, VmName};
use serde::{Deserialize, Serialize};

/// Highest security level a VM can carry. Levels are compared with host
/// trust levels by policy; capping them keeps labels from a peer within the
/// range the policies were written for.
pub const MAX_SECURITY_LEVEL: u8 = 3;

/// Labels a VM carries (set when it is started; travel with it in the
/// migration offer).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmLabels {
    /// Tenant that owns the VM.
    pub tenant: String,
    /// 0..=[`MAX_SECURITY_LEVEL`]; higher means more sensitive.
    pub security_level: u8,
    /// Zones the VM may run in; empty means no zone restriction.
    #[serde(default)]
    pub allowed_zones: Vec<String>,
    /// Tenants the VM must not share a host with.
    #[serde(default)]
    pub anti_affinity: Vec<String>,
}

impl VmLabels {
    /// Why these labels cannot be used in a decision, if they cannot.
    /// Labels may come from a peer, so they are checked before they reach
    /// policy rather than trusted to be in range.
    pub fn problem(&self) -> Option<String> {
        if self.tenant.is_empty() {
            return Some("VM labels have an empty tenant".to_owned());
        }
        if self.security_level > MAX_SECURITY_LEVEL {
            return Some(format!(
                "VM security level {} is above the maximum {MAX_SECURITY_LEVEL}",
                self.security_level
            ));
        }
        None
    }
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// An operator, acting in `role` (which policy checks against the roles
    /// the entities file gives the operator).
    Operator { name: OperatorName, role: String },
    /// A host agent, identified by its (mTLS-authenticated) host name.
    Host { name: HostName },
}

/// What is being asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// An operator asks the source to migrate a VM.
    MigrateVm,
    /// The source host sends a VM.
    SendVm,
    /// The destination host receives a VM.
    ReceiveVm,
    /// A host starts a new VM on itself (`ferry vm start`). Decided with
    /// `source` = `destination` = that host, on its residents.
    StartVm,
}

impl Action {
    /// The Cedar action id (`Action::"<name>"`).
    pub fn cedar_name(self) -> &'static str {
        match self {
            Action::MigrateVm => "MigrateVm",
            Action::SendVm => "SendVm",
            Action::ReceiveVm => "ReceiveVm",
            Action::StartVm => "StartVm",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cedar_name())
    }
}

/// A VM already on the destination (running, arriving or leaving), with
/// everything it declared when it was started: its placement constraints
/// must protect it whichever VM moves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Resident {
    pub name: VmName,
    pub labels: VmLabels,
}

/// One authorization question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub principal: Principal,
    pub action: Action,
    pub vm: VmName,
    pub labels: VmLabels,
    pub source: HostName,
    pub destination: HostName,
    pub postcopy: bool,
    /// Each host's platform attested for this migration (see the schema).
    pub source_attested: bool,
    pub destination_attested: bool,
    /// Seconds since the Unix epoch; passed in so decisions stay pure.
    pub now_unix: i64,
    /// Only the destination knows this; the source passes an empty list.
    /// For [`Action::StartVm`], the VMs already on the starting host.
    pub resident_on_destination: Vec<Resident>,
}

/// The answer. "Policy says no" is a value, not an error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed; `policies` are the ids of the permit policies that matched.
    Allow { policies: Vec<String> },
    /// Denied; `reason` is for people, `policies` are the ids of the forbid
    /// policies that matched (empty for a default deny), `residents` the
    /// resident VMs whose presence alone made one of them match.
    Deny { reason: String, policies: Vec<String>, residents: Vec<VmName> },
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// Policy ids that determined the decision.
    pub fn policies(&self) -> &[String] {
        match self {
            Decision::Allow { policies } | Decision::Deny { policies, .. } => policies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_refuse_unknown_fields_and_default_lists() {
        let l: VmLabels =
            serde_json::from_str(r#"{"tenant":"blue","security_level":2}"#).expect("parse");
        assert!(l.allowed_zones.is_empty() && l.anti_affinity.is_empty());
        assert!(l.problem().is_none());
        assert!(serde_json::from_str::<VmLabels>(
            r#"{"tenant":"blue","security_level":2,"zone":"x"}"#
        )
        .is_err());
        let high = VmLabels { security_level: MAX_SECURITY_LEVEL + 1, ..l.clone() };
        assert!(high.problem().is_some());
        let nameless = VmLabels { tenant: String::new(), ..l };
        assert!(nameless.problem().is_some());
    }
}
