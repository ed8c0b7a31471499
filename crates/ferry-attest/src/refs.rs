//! Reference values: which PCR values each host class may have.
//!
//! ```toml
//! [hosts]
//! alpha = "lab"
//! beta = "lab"
//!
//! [classes.lab]
//! pcrs = { "0" = "3d45...", "7" = "..." }   # SHA-256 bank
//! ```
//!
//! The set of PCRs listed for a class *is* that class's PCR selection: a
//! quote must cover exactly those PCRs, no fewer (an unchecked PCR would be a
//! silent hole) and no more (so one policy file states the whole decision).

use std::collections::BTreeMap;
use std::path::Path;

use ferry_types::HostName;
use serde::{Deserialize, Serialize};

use crate::evidence::MAX_PCRS;
use crate::AttestError;

/// Largest reference-value file read.
pub const MAX_REFERENCE_FILE: u64 = 1024 * 1024;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    hosts: BTreeMap<HostName, String>,
    #[serde(default)]
    classes: BTreeMap<String, RawClass>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    pcrs: BTreeMap<String, String>,
}

/// Allowed PCR values per host class, and each host's class.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReferenceValues {
    hosts: BTreeMap<HostName, String>,
    classes: BTreeMap<String, BTreeMap<u8, [u8; 32]>>,
}

impl ReferenceValues {
    /// An empty set: every host is refused until given a class.
    pub fn new() -> Self {
        Self::default()
    }

    /// Define (or replace) a class with its PCR values; its keys are its selection.
    pub fn set_class(
        &mut self,
        class: &str,
        pcrs: BTreeMap<u8, [u8; 32]>,
    ) -> Result<(), AttestError> {
        if let Some(&pcr) = pcrs.keys().find(|&&p| usize::from(p) >= MAX_PCRS) {
            return Err(AttestError::BadPcrIndex { pcr });
        }
        self.classes.insert(class.to_owned(), pcrs);
        Ok(())
    }

    /// Put a host in a class.
    pub fn assign(&mut self, host: HostName, class: &str) {
        self.hosts.insert(host, class.to_owned());
    }

    /// Load and validate a reference file.
    pub fn load(path: &Path) -> Result<Self, AttestError> {
        let text = crate::registry::read_capped(path, MAX_REFERENCE_FILE)?;
        Self::from_toml(&text).map_err(|why| AttestError::config(path, why))
    }

    /// Parse reference values from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let raw: RawFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut out = ReferenceValues { hosts: raw.hosts, classes: BTreeMap::new() };
        for (name, class) in raw.classes {
            let mut pcrs = BTreeMap::new();
            for (k, v) in class.pcrs {
                let pcr: u8 = k
                    .parse()
                    .ok()
                    .filter(|&p: &u8| usize::from(p) < MAX_PCRS)
                    .ok_or_else(|| format!("class {name}: invalid PCR index {k:?}"))?;
                let value: [u8; 32] = hex::decode(&v)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| format!("class {name}: PCR {pcr} is not 64 hex digits"))?;
                pcrs.insert(pcr, value);
            }
            if pcrs.is_empty() {
                return Err(format!("class {name}: no PCRs (an empty selection attests nothing)"));
            }
            out.classes.insert(name, pcrs);
        }
        // A host assigned to an undefined class would otherwise surface only
        // at migration time; refuse the file instead.
        for (host, class) in &out.hosts {
            if !out.classes.contains_key(class) {
                return Err(format!("host {host} is in undefined class {class:?}"));
            }
        }
        Ok(out)
    }

    /// Render as TOML (for `ferry attest measure` and the lab).
    pub fn to_toml(&self) -> Result<String, AttestError> {
        let raw = RawFile {
            hosts: self.hosts.clone(),
            classes: self
                .classes
                .iter()
                .map(|(name, pcrs)| {
                    let pcrs = pcrs.iter().map(|(k, v)| (k.to_string(), hex::encode(v))).collect();
                    (name.clone(), RawClass { pcrs })
                })
                .collect(),
        };
        toml::to_string(&raw).map_err(|e| AttestError::malformed("reference values", e.to_string()))
    }

    /// Write as TOML.
    pub fn save(&self, path: &Path) -> Result<(), AttestError> {
        let text = self.to_toml()?;
        crate::registry::write_atomic(path, text.as_bytes(), 0o644)
    }

    /// Add another file's classes and host assignments (collecting each
    /// host's measurements into the cluster's file). A class defined in both
    /// with other values, or a host put in two classes, is refused: that is
    /// two different platforms claiming one name.
    pub fn merge(&mut self, other: &ReferenceValues) -> Result<(), String> {
        for (class, pcrs) in &other.classes {
            if self.classes.get(class).is_some_and(|mine| mine != pcrs) {
                return Err(format!(
                    "class {class:?} is defined twice with different PCR values: measure each \
                     kind of platform under its own class name"
                ));
            }
        }
        for (host, class) in &other.hosts {
            if let Some(mine) = self.hosts.get(host).filter(|mine| *mine != class) {
                return Err(format!("host {host} is in class {mine:?} and in class {class:?}"));
            }
        }
        self.classes.extend(other.classes.clone());
        self.hosts.extend(other.hosts.clone());
        Ok(())
    }

    /// The PCR selection (ascending) the host's quotes must cover.
    pub fn selection_for(&self, host: &HostName) -> Option<Vec<u8>> {
        self.expected(host).map(|m| m.keys().copied().collect())
    }

    /// The reference values for the host's class.
    pub fn expected(&self, host: &HostName) -> Option<&BTreeMap<u8, [u8; 32]>> {
        self.hosts.get(host).and_then(|class| self.classes.get(class))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_validation() {
        let host: HostName = "alpha".parse().expect("host");
        let mut r = ReferenceValues::new();
        r.set_class("lab", BTreeMap::from([(0, [1; 32]), (7, [2; 32])])).expect("class");
        r.assign(host.clone(), "lab");
        let text = r.to_toml().expect("toml");
        let back = ReferenceValues::from_toml(&text).expect("parse");
        assert_eq!(back, r);
        assert_eq!(back.selection_for(&host), Some(vec![0, 7]));
        assert!(ReferenceValues::from_toml("[hosts]\nalpha = \"nope\"\n").is_err());
        assert!(ReferenceValues::from_toml("[classes.x]\npcrs = { \"30\" = \"00\" }\n").is_err());
        assert!(ReferenceValues::from_toml("[bogus]\n").is_err());
    }

    #[test]
    fn merging_collects_hosts_and_refuses_conflicts() {
        let (a, b): (HostName, HostName) =
            ("alpha".parse().expect("a"), "beta".parse().expect("b"));
        let mut one = ReferenceValues::new();
        one.set_class("gen10", BTreeMap::from([(0, [1; 32])])).expect("class");
        one.assign(a.clone(), "gen10");
        let mut two = ReferenceValues::new();
        two.set_class("gen10", BTreeMap::from([(0, [1; 32])])).expect("class");
        two.assign(b.clone(), "gen10");
        let mut all = ReferenceValues::new();
        all.merge(&one).expect("one");
        all.merge(&two).expect("same class, same values");
        assert_eq!(all.selection_for(&a), Some(vec![0]));
        assert_eq!(all.selection_for(&b), Some(vec![0]));

        let mut other = ReferenceValues::new();
        other.set_class("gen10", BTreeMap::from([(0, [9; 32])])).expect("class");
        let e = all.merge(&other).expect_err("conflict");
        assert!(e.contains("\"gen10\" is defined twice"), "{e}");
        let mut moved = ReferenceValues::new();
        moved.set_class("gen11", BTreeMap::from([(0, [2; 32])])).expect("class");
        moved.assign(a, "gen11");
        assert!(all.merge(&moved).expect_err("two classes").contains("alpha"));
    }
}
