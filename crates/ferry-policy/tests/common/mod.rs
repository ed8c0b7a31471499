//! Shared helpers: the example policy files from docs/policy and a request
//! builder with sensible defaults, so each test states only what it varies.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

use ferry_policy::{Action, PolicyEngine, Principal, Request, Resident, VmLabels};

pub fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/policy")
}

pub fn example_policies() -> Vec<PathBuf> {
    vec![docs().join("ferry.cedar")]
}

pub fn example_entities() -> PathBuf {
    docs().join("entities.json")
}

pub fn example_engine() -> PolicyEngine {
    PolicyEngine::load(&example_policies(), &example_entities()).expect("example policy loads")
}

pub fn operator(name: &str, role: &str) -> Principal {
    Principal::Operator { name: name.parse().expect("operator name"), role: role.to_owned() }
}

pub fn host(name: &str) -> Principal {
    Principal::Host { name: name.parse().expect("host name") }
}

pub fn labels(tenant: &str, level: u8) -> VmLabels {
    VmLabels {
        tenant: tenant.to_owned(),
        security_level: level,
        allowed_zones: Vec::new(),
        anti_affinity: Vec::new(),
    }
}

/// host-a (zone-1, trust 3) -> host-b (zone-1, trust 2), pre-copy.
pub fn request(principal: Principal, action: Action, labels: VmLabels) -> Request {
    Request {
        principal,
        action,
        vm: "web-1".parse().expect("vm name"),
        labels,
        source: "host-a".parse().expect("host"),
        destination: "host-b".parse().expect("host"),
        postcopy: false,
        source_attested: true,
        destination_attested: true,
        now_unix: 1_700_000_000,
        resident_on_destination: Vec::new(),
    }
}

/// A resident VM of `tenant` (named after it) that excludes nobody.
pub fn resident(tenant: &str) -> Resident {
    Resident { name: format!("{tenant}-vm").parse().expect("vm name"), labels: labels(tenant, 0) }
}

/// A resident VM `name` of `tenant` that must not share a host with `excludes`.
pub fn excluding(name: &str, tenant: &str, excludes: &[&str]) -> Resident {
    let mut l = labels(tenant, 0);
    l.anti_affinity = excludes.iter().map(|t| (*t).to_owned()).collect();
    Resident { name: name.parse().expect("vm name"), labels: l }
}
