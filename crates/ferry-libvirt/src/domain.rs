//! What Ferry reads from a libvirt domain's XML: its identity and size (the
//! Offer's spec, and what a Prepare must match), its vTPM, its placement
//! labels and the parts of a definition Ferry refuses to carry.

use ferry_policy::VmLabels;
use ferry_types::VmName;
use ferry_vmm::{Boot, DomainUuid, MachineType, TpmModel, VmSpec};

/// The XML namespace of Ferry's labels in a domain's `<metadata>`.
pub const LABELS_NAMESPACE: &str = "https://ferry.dev/xmlns/labels/1";
/// libvirt's namespace for raw QEMU command-line passthrough.
const QEMU_NAMESPACE: &str = "http://libvirt.org/schemas/domain/qemu/1.0";
/// Largest domain XML read (libvirt's own strings stop at 4 MiB).
pub const MAX_DOMAIN_XML: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the domain XML is not well-formed: {0}")]
    Xml(String),
    #[error("the domain XML is {len} bytes, more than {MAX_DOMAIN_XML}")]
    TooLarge { len: usize },
    #[error("the domain XML has no {0}")]
    Missing(&'static str),
    #[error("the domain XML's {what} {got:?} is invalid: {why}")]
    Invalid { what: &'static str, got: String, why: String },
    #[error("domain {name} runs machine type {machine:?}; Ferry carries pc and q35 machines")]
    Machine { name: String, machine: String },
    #[error(
        "domain {name} passes raw QEMU arguments (<qemu:{element}>), which Ferry does not carry"
    )]
    Passthrough { name: String, element: String },
    #[error("domain {name}'s Ferry labels are invalid: {why}")]
    Labels { name: String, why: String },
}

/// A domain's virtual TPM, as its XML declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmFacts {
    /// `tpm-crb` or `tpm-tis`.
    pub model: String,
    /// `emulator` (swtpm) or `passthrough`.
    pub backend: String,
    pub version: Option<String>,
    /// `persistent_state='yes'`: the operator asked libvirt to keep the
    /// state when the domain goes away from a host.
    pub persistent_state: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    pub name: String,
    pub uuid: String,
    pub memory_kib: u64,
    pub vcpus: u32,
    /// As libvirt writes it, e.g. `pc-i440fx-7.2`.
    pub machine: String,
    /// `qemu` (TCG) or `kvm`.
    pub virt_type: String,
    pub tpm: Option<TpmFacts>,
    /// Ferry's labels from `<metadata>`, if the operator set them.
    pub labels: Option<VmLabels>,
    /// Where the first serial port writes, if to a file.
    pub serial_log: Option<String>,
    /// Elements of libvirt's QEMU passthrough namespace, by name.
    pub passthrough: Vec<String>,
}

impl DomainFacts {
    pub fn parse(xml: &str) -> Result<Self, DomainError> {
        if xml.len() > MAX_DOMAIN_XML {
            return Err(DomainError::TooLarge { len: xml.len() });
        }
        let doc = roxmltree::Document::parse(xml).map_err(|e| DomainError::Xml(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "domain" {
            return Err(DomainError::Missing("<domain> root element"));
        }
        let child = |name: &str| root.children().find(|n| n.has_tag_name(name));
        let text = |name: &'static str| {
            child(name)
                .and_then(|n| n.text())
                .map(|t| t.trim().to_owned())
                .ok_or(DomainError::Missing(name))
        };
        let name = text("name")?;
        let uuid = text("uuid")?;
        let memory = child("memory").ok_or(DomainError::Missing("memory"))?;
        let memory_kib = to_kib(
            memory.text().unwrap_or_default().trim(),
            memory.attribute("unit").unwrap_or("KiB"),
        )?;
        let vcpus = text("vcpu")?;
        let vcpus = vcpus.parse::<u32>().map_err(|e| DomainError::Invalid {
            what: "vcpu",
            got: vcpus.clone(),
            why: e.to_string(),
        })?;
        let os_type = child("os").and_then(|os| os.children().find(|n| n.has_tag_name("type")));
        let machine = os_type.and_then(|t| t.attribute("machine")).unwrap_or_default().to_owned();
        let devices = child("devices");
        let device = |name: &str| devices.and_then(|d| d.children().find(|n| n.has_tag_name(name)));
        let tpm = device("tpm").map(|t| {
            let backend = t.children().find(|n| n.has_tag_name("backend"));
            TpmFacts {
                model: t.attribute("model").unwrap_or("tpm-tis").to_owned(),
                backend: backend.and_then(|b| b.attribute("type")).unwrap_or_default().to_owned(),
                version: backend.and_then(|b| b.attribute("version")).map(str::to_owned),
                persistent_state: backend.and_then(|b| b.attribute("persistent_state"))
                    == Some("yes"),
            }
        });
        let serial_log = device("serial")
            .filter(|s| s.attribute("type") == Some("file"))
            .and_then(|s| s.children().find(|n| n.has_tag_name("source")))
            .and_then(|s| s.attribute("path"))
            .map(str::to_owned);
        let passthrough = root
            .descendants()
            .filter(|n| n.is_element() && n.tag_name().namespace() == Some(QEMU_NAMESPACE))
            .map(|n| n.tag_name().name().to_owned())
            .collect();
        let labels = child("metadata")
            .and_then(|m| m.children().find(|n| n.has_tag_name((LABELS_NAMESPACE, "labels"))))
            .map(|l| labels_from(&name, l))
            .transpose()?;
        Ok(DomainFacts {
            name,
            uuid,
            memory_kib,
            vcpus,
            machine,
            virt_type: root.attribute("type").unwrap_or_default().to_owned(),
            tpm,
            labels,
            serial_log,
            passthrough,
        })
    }

    /// The spec an Offer carries for this domain. Both hosts derive it with
    /// this one function, so the destination's comparison of a Prepare's
    /// XML with the signed Offer is exact.
    pub fn spec(&self) -> Result<VmSpec, DomainError> {
        let name: VmName = self.name.parse().map_err(|e: ferry_types::ParseError| {
            DomainError::Invalid { what: "name", got: self.name.clone(), why: e.to_string() }
        })?;
        let uuid: DomainUuid = self.uuid.parse().map_err(|e: ferry_vmm::SpecError| {
            DomainError::Invalid { what: "uuid", got: self.uuid.clone(), why: e.to_string() }
        })?;
        if let Some(element) = self.passthrough.first() {
            return Err(DomainError::Passthrough {
                name: self.name.clone(),
                element: element.clone(),
            });
        }
        let tpm = match self.tpm.as_ref().map(|t| t.model.as_str()) {
            None => TpmModel::None,
            Some("tpm-crb") => TpmModel::Crb,
            Some("tpm-tis") => TpmModel::Tis,
            Some(other) => {
                return Err(DomainError::Invalid {
                    what: "tpm model",
                    got: other.to_owned(),
                    why: "Ferry knows tpm-crb and tpm-tis".into(),
                })
            }
        };
        let machine = if self.machine.contains("q35") {
            MachineType::Q35
        } else if self.machine == "pc" || self.machine.starts_with("pc-i440fx") {
            MachineType::Pc
        } else {
            return Err(DomainError::Machine {
                name: self.name.clone(),
                machine: self.machine.clone(),
            });
        };
        let memory_mib = u32::try_from(self.memory_kib.div_ceil(1024)).unwrap_or(u32::MAX);
        let spec = VmSpec {
            name,
            memory_mib,
            vcpus: self.vcpus,
            machine,
            boot: Boot::Domain { uuid },
            tpm,
        };
        spec.validate().map_err(|e| DomainError::Invalid {
            what: "size",
            got: format!("{} KiB, {} vCPUs", self.memory_kib, self.vcpus),
            why: e.to_string(),
        })?;
        Ok(spec)
    }
}

fn to_kib(value: &str, unit: &str) -> Result<u64, DomainError> {
    let invalid = |why: &str| DomainError::Invalid {
        what: "memory",
        got: format!("{value} {unit}"),
        why: why.to_owned(),
    };
    let n: u64 = value.parse().map_err(|_| invalid("not a whole number"))?;
    let bytes_per_unit: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "T" | "TiB" => 1 << 40,
        _ => return Err(invalid("unknown unit")),
    };
    let bytes = n.checked_mul(bytes_per_unit).ok_or_else(|| invalid("too large"))?;
    Ok(bytes.div_ceil(1024))
}

/// `<ferry:labels tenant="acme" security-level="2" zones="eu-1 eu-2"
/// anti-affinity="rival"/>`; lists are space-separated.
fn labels_from(name: &str, node: roxmltree::Node) -> Result<VmLabels, DomainError> {
    let list = |attr: &str| -> Vec<String> {
        node.attribute(attr).unwrap_or_default().split_whitespace().map(str::to_owned).collect()
    };
    let level = node.attribute("security-level").unwrap_or("0");
    let labels = VmLabels {
        tenant: node.attribute("tenant").unwrap_or("default").to_owned(),
        security_level: level.parse().map_err(|_| DomainError::Labels {
            name: name.to_owned(),
            why: format!("security-level {level:?} is not a number"),
        })?,
        allowed_zones: list("zones"),
        anti_affinity: list("anti-affinity"),
    };
    if let Some(why) = labels.problem() {
        return Err(DomainError::Labels { name: name.to_owned(), why });
    }
    Ok(labels)
}

#[cfg(test)]
#[path = "domain_tests.rs"]
mod tests;
