//! What a VM is, as an operator (or a migration peer) describes it.
//!
//! A [`VmSpec`] arrives over the network inside migration offers, so it is a
//! closed vocabulary: no free-form QEMU arguments and no host paths. Disk and
//! kernel images are named by [`ImageName`], which the *receiving* host
//! resolves against its own configured images directory. Deserialization
//! validates, so a `VmSpec` that came from serde is already within limits.

use std::fmt;
use std::str::FromStr;

use ferry_types::VmName;
use serde::{Deserialize, Serialize};

/// Smallest guest: SeaBIOS and a tiny kernel need a few MiB; below this QEMU
/// either refuses or the guest cannot boot, so refuse early with a clear error.
pub const MIN_MEMORY_MIB: u32 = 16;
/// Largest guest memory we accept from a peer (1 TiB): bounds what a peer can
/// make this host reserve.
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
/// Largest vCPU count: 255 is the xAPIC limit that both `pc` and `q35` honour
/// without an IOMMU / x2APIC setup.
pub const MAX_VCPUS: u32 = 255;
/// Longest kernel command line: x86 Linux's `COMMAND_LINE_SIZE` is 2048
/// including the terminating NUL.
pub const MAX_KERNEL_CMDLINE: usize = 2047;
/// Longest image file name.
pub const MAX_IMAGE_NAME: usize = 128;

/// Why a spec or an image name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("memory_mib {got} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}")]
    Memory { got: u32 },
    #[error("vcpus {got} is outside 1..={MAX_VCPUS}")]
    Vcpus { got: u32 },
    #[error("image name {name:?} is invalid: {why}")]
    ImageName { name: String, why: &'static str },
    #[error("kernel command line is invalid: {why}")]
    Cmdline { why: &'static str },
    #[error("{got:?} is not a UUID (8-4-4-4-12 hexadecimal digits)")]
    DomainUuid { got: String },
    #[error("disk bus {bus} does not exist on machine {machine}: {why}")]
    DiskBus { bus: DiskBus, machine: &'static str, why: &'static str },
}

/// QEMU machine type. Only the two x86 families are offered; both hosts map
/// the same variant to the same machine string, which migration requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    Q35,
    Pc,
}

impl MachineType {
    /// The `-machine` value. These are QEMU's unversioned aliases, which
    /// resolve to the newest versioned type of the running QEMU: migration
    /// therefore assumes both hosts run the same QEMU release.
    pub fn qemu_name(self) -> &'static str {
        match self {
            MachineType::Q35 => "q35",
            MachineType::Pc => "pc",
        }
    }
}

/// On-disk format of a disk image, decided by its extension so that QEMU is
/// always told the format and never probes it (probing a raw image that a
/// guest wrote a qcow2 header into is a classic escape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn qemu_name(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

/// A file name inside the host's images directory: 1..=128 characters of
/// `A-Za-z0-9._-`, no leading `.` or `-`, no `..`. It has no `/`, so joining
/// it to the images directory can never leave that directory, and no `,`,
/// so it needs no escaping inside QEMU option strings.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageName(String);

impl ImageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `.qcow2` images are qcow2; everything else is raw.
    pub fn disk_format(&self) -> DiskFormat {
        if self.0.ends_with(".qcow2") {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        }
    }
}

fn check_image_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_IMAGE_NAME {
        return Err("must be 1 to 128 characters");
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-') {
        return Err("may contain only A-Z, a-z, 0-9, '.', '_' and '-'");
    }
    if s.starts_with('.') || s.starts_with('-') {
        return Err("must not start with '.' or '-'");
    }
    if s.contains("..") {
        return Err("must not contain '..'");
    }
    Ok(())
}

impl TryFrom<String> for ImageName {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        check_image_name(&s)
            .map_err(|why| SpecError::ImageName { name: s.chars().take(80).collect(), why })?;
        Ok(Self(s))
    }
}
impl FromStr for ImageName {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        Self::try_from(s.to_owned())
    }
}
impl From<ImageName> for String {
    fn from(n: ImageName) -> String {
        n.0
    }
}
impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The controller a boot disk is attached to. Virtio is the fastest; IDE
/// and SATA (AHCI) are for images whose boot loader or kernel has no virtio
/// driver. Part of the machine both ends of a migration must build alike,
/// so it travels in the spec and is a closed set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    /// The `pc` machine's PIIX IDE controller (q35 has none).
    Ide,
    /// An AHCI controller: q35's built-in one, or one added to `pc`.
    Sata,
}

impl DiskBus {
    pub const ALL: [DiskBus; 3] = [DiskBus::Virtio, DiskBus::Ide, DiskBus::Sata];

    pub fn name(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Ide => "ide",
            DiskBus::Sata => "sata",
        }
    }

    /// Virtio is left out of the encoded spec, so a spec that does not
    /// choose a bus encodes exactly as before buses existed, and agents
    /// that predate them still accept its offers.
    fn is_default(&self) -> bool {
        *self == DiskBus::default()
    }
}

impl fmt::Display for DiskBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DiskBus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DiskBus::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown disk bus {s:?}: expected one of virtio, ide, sata"))
    }
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot (`-kernel/-initrd/-append`).
    Kernel {
        kernel: ImageName,
        #[serde(default)]
        initrd: Option<ImageName>,
        /// Printable ASCII only, at most [`MAX_KERNEL_CMDLINE`] bytes.
        #[serde(default)]
        cmdline: String,
    },
    /// Boot from one disk through the firmware.
    Disk {
        image: ImageName,
        /// Specs written before buses existed mean virtio.
        #[serde(default, skip_serializing_if = "DiskBus::is_default")]
        bus: DiskBus,
    },
    /// A libvirt domain: libvirt boots it from its own definition, which
    /// travels in libvirt's migration and must match this spec.
    Domain { uuid: DomainUuid },
}

impl Boot {
    pub fn is_domain(&self) -> bool {
        matches!(self, Boot::Domain { .. })
    }
}

/// A libvirt domain's UUID, canonical (lowercase, hyphenated).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DomainUuid(String);

impl DomainUuid {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DomainUuid {
    type Error = SpecError;
    fn try_from(s: String) -> Result<Self, SpecError> {
        let canonical = s.to_ascii_lowercase();
        let groups: Vec<&str> = canonical.split('-').collect();
        let shape = groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
        let hex = canonical.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit());
        if !(shape && hex) {
            return Err(SpecError::DomainUuid { got: s.chars().take(40).collect() });
        }
        Ok(Self(canonical))
    }
}
impl FromStr for DomainUuid {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        Self::try_from(s.to_owned())
    }
}
impl From<DomainUuid> for String {
    fn from(u: DomainUuid) -> String {
        u.0
    }
}
impl fmt::Display for DomainUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Debug for DomainUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

fn check_cmdline(s: &str) -> Result<(), SpecError> {
    if s.len() > MAX_KERNEL_CMDLINE {
        return Err(SpecError::Cmdline { why: "longer than 2047 bytes" });
    }
    // Printable ASCII only: the kernel parses bytes, and newlines or NULs
    // would let a peer smuggle structure into logs and the kernel parser.
    if !s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(SpecError::Cmdline {
            why: "may contain only printable ASCII (no control characters)",
        });
    }
    Ok(())
}

/// A VM as an operator describes it. See the module docs for why it is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawVmSpec")]
pub struct VmSpec {
    pub name: VmName,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub machine: MachineType,
    pub boot: Boot,
}

/// The wire shape of [`VmSpec`] before validation; serde goes through it so
/// an out-of-limits spec never exists as a `VmSpec` after deserialization.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVmSpec {
    name: VmName,
    memory_mib: u32,
    vcpus: u32,
    machine: MachineType,
    boot: Boot,
}

impl TryFrom<RawVmSpec> for VmSpec {
    type Error = SpecError;
    fn try_from(r: RawVmSpec) -> Result<Self, SpecError> {
        let spec = VmSpec {
            name: r.name,
            memory_mib: r.memory_mib,
            vcpus: r.vcpus,
            machine: r.machine,
            boot: r.boot,
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl VmSpec {
    /// Checks the numeric limits and the kernel command line. Names are
    /// already valid by construction of their types.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(SpecError::Memory { got: self.memory_mib });
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(SpecError::Vcpus { got: self.vcpus });
        }
        match &self.boot {
            Boot::Kernel { cmdline, .. } => check_cmdline(cmdline)?,
            Boot::Disk { bus: DiskBus::Ide, .. } if self.machine == MachineType::Q35 => {
                return Err(SpecError::DiskBus {
                    bus: DiskBus::Ide,
                    machine: self.machine.qemu_name(),
                    why: "q35 has no IDE controller; use sata (its AHCI controller) or machine pc",
                });
            }
            Boot::Disk { .. } | Boot::Domain { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec_json(extra: &str) -> String {
        format!(
            r#"{{"name":"vm1","memory_mib":256,"vcpus":2,"machine":"q35",
                "boot":{{"type":"kernel","kernel":"vmlinuz","cmdline":"console=ttyS0"}}{extra}}}"#
        )
    }

    fn kernel_spec(cmdline: &str) -> VmSpec {
        VmSpec {
            name: "vm1".parse().unwrap(),
            memory_mib: 256,
            vcpus: 1,
            machine: MachineType::Pc,
            boot: Boot::Kernel {
                kernel: "k".parse().unwrap(),
                initrd: None,
                cmdline: cmdline.to_owned(),
            },
        }
    }

    #[test]
    fn good_spec_round_trips() {
        let spec: VmSpec = serde_json::from_str(&spec_json("")).unwrap();
        assert_eq!(spec.memory_mib, 256);
        let back: VmSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        let disk = r#"{"name":"d","memory_mib":64,"vcpus":1,"machine":"pc",
                       "boot":{"type":"disk","image":"root.qcow2"}}"#;
        let spec: VmSpec = serde_json::from_str(disk).unwrap();
        let Boot::Disk { image, bus } = &spec.boot else { panic!("not disk") };
        assert_eq!(image.disk_format(), DiskFormat::Qcow2);
        assert_eq!(*bus, DiskBus::Virtio, "a spec without a bus means virtio");
        assert!(!serde_json::to_string(&spec).unwrap().contains("bus"), "old peers refuse it");
        assert_eq!("a.img".parse::<ImageName>().unwrap().disk_format(), DiskFormat::Raw);
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<VmSpec>(&spec_json(r#","qemu_args":["-S"]"#)).is_err());
        let boot = r#"{"name":"d","memory_mib":64,"vcpus":1,"machine":"pc",
                       "boot":{"type":"disk","image":"x","path":"/etc/shadow"}}"#;
        assert!(serde_json::from_str::<VmSpec>(boot).is_err());
        let machine = spec_json("").replace("q35", "microvm");
        assert!(serde_json::from_str::<VmSpec>(&machine).is_err());
    }

    #[test]
    fn limits_are_enforced() {
        for (mem, cpus) in
            [(0, 1), (MAX_MEMORY_MIB + 1, 1), (MIN_MEMORY_MIB - 1, 1), (64, 0), (64, MAX_VCPUS + 1)]
        {
            let mut s = kernel_spec("");
            s.memory_mib = mem;
            s.vcpus = cpus;
            assert!(s.validate().is_err(), "{mem} MiB / {cpus} vcpus accepted");
            let json = serde_json::to_string(&s).unwrap();
            assert!(serde_json::from_str::<VmSpec>(&json).is_err(), "deserialized {json}");
        }
        let mut s = kernel_spec("");
        s.memory_mib = MAX_MEMORY_MIB;
        s.vcpus = MAX_VCPUS;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn image_names_cannot_escape() {
        for good in ["disk.raw", "vmlinuz-6.1", "a_b.qcow2", "a.b.c"] {
            assert!(good.parse::<ImageName>().is_ok(), "{good:?} refused");
        }
        let long = "x".repeat(MAX_IMAGE_NAME + 1);
        for bad in [
            "",
            "a/b",
            "/etc/passwd",
            "..",
            "a..b",
            ".hidden",
            "-drive",
            "a,b",
            "a b",
            "a\0",
            &long,
        ] {
            assert!(bad.parse::<ImageName>().is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<ImageName>(r#""../../etc/shadow""#).unwrap_err();
        assert!(err.to_string().contains("image name"), "{err}");
    }

    fn disk_spec(machine: &str, bus: &str) -> Result<VmSpec, serde_json::Error> {
        serde_json::from_str(&format!(
            r#"{{"name":"d","memory_mib":64,"vcpus":1,"machine":"{machine}",
                "boot":{{"type":"disk","image":"root.qcow2","bus":"{bus}"}}}}"#
        ))
    }

    #[test]
    fn disk_buses_are_closed_and_fit_the_machine() {
        for (machine, bus) in [("pc", "ide"), ("pc", "sata"), ("q35", "sata"), ("q35", "virtio")] {
            let spec = disk_spec(machine, bus).unwrap();
            let back: VmSpec =
                serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
            assert_eq!(back, spec, "{machine}/{bus}");
        }
        let sata = serde_json::to_string(&disk_spec("pc", "sata").unwrap()).unwrap();
        assert!(sata.contains(r#""bus":"sata""#), "{sata}");
        for bad in ["scsi", "IDE", "virtio-blk", ""] {
            let err = disk_spec("pc", bad).unwrap_err().to_string();
            assert!(err.contains("unknown variant"), "{bad:?}: {err}");
        }
        let err = disk_spec("q35", "ide").unwrap_err().to_string();
        assert!(err.contains("disk bus ide does not exist on machine q35"), "{err}");
        assert_eq!("sata".parse::<DiskBus>(), Ok(DiskBus::Sata));
        let err = "scsi".parse::<DiskBus>().unwrap_err();
        assert!(err.contains("virtio, ide, sata"), "{err}");
    }

    #[test]
    fn cmdline_is_printable_and_bounded() {
        assert!(kernel_spec("console=ttyS0 quiet init=/bin/sh").validate().is_ok());
        for bad in ["a\nb", "a\0b", "a\tb", "\x1b[31m", "caf\u{e9}"] {
            assert!(kernel_spec(bad).validate().is_err(), "{bad:?} accepted");
        }
        assert!(kernel_spec(&"x".repeat(MAX_KERNEL_CMDLINE)).validate().is_ok());
        assert!(kernel_spec(&"x".repeat(MAX_KERNEL_CMDLINE + 1)).validate().is_err());
    }
}
