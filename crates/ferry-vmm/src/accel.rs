//! Choosing between KVM and TCG.
//!
//! `/dev/kvm` existing is not enough: on nested cloud machines it can be
//! backed by `kvm_pvm`, a software virtualiser that runs ordinary guests far
//! slower than TCG. Only the hardware modules (`kvm_intel`, `kvm_amd`) make
//! KVM the right automatic choice.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::VmmError;

/// What the host configuration asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// [`detect_accel`] decides.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a QEMU actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// `-cpu host` aborts under TCG and under kvm_pvm (MSR 0x10a), so it is
    /// used only with hardware KVM; `max` is TCG's richest model.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        }
    }
}

const HW_KVM_MODULES: [&str; 2] = ["kvm_intel", "kvm_amd"];

/// KVM when a hardware KVM module is loaded and `/dev/kvm` exists, else TCG.
pub fn detect_accel() -> Accel {
    detect_accel_in(Path::new("/sys/module"), Path::new("/dev/kvm"))
}

/// [`detect_accel`] against other roots, for tests.
pub fn detect_accel_in(sys_module: &Path, dev_kvm: &Path) -> Accel {
    let hw = HW_KVM_MODULES.iter().any(|m| sys_module.join(m).exists());
    if hw && dev_kvm.exists() {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Turns the configured choice into the accelerator to use. Forcing KVM on a
/// host without `/dev/kvm` is an error now rather than a QEMU failure later.
pub fn resolve_accel(choice: AccelChoice) -> Result<Accel, VmmError> {
    match choice {
        AccelChoice::Auto => Ok(detect_accel()),
        AccelChoice::Tcg => Ok(Accel::Tcg),
        AccelChoice::Kvm if Path::new("/dev/kvm").exists() => Ok(Accel::Kvm),
        AccelChoice::Kvm => Err(VmmError::KvmUnavailable),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn detect_matches_this_host() {
        // Computed from the real /sys/module so the test also holds on
        // hardware-KVM hosts, where Auto must pick KVM.
        let hw = Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists();
        let expected = if hw && Path::new("/dev/kvm").exists() { Accel::Kvm } else { Accel::Tcg };
        assert_eq!(detect_accel(), expected);
        assert_eq!(resolve_accel(AccelChoice::Auto).unwrap(), expected);
        assert_eq!(resolve_accel(AccelChoice::Tcg).unwrap(), Accel::Tcg);
    }

    #[test]
    fn pvm_alone_is_not_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("module");
        std::fs::create_dir_all(sys.join("kvm")).unwrap();
        std::fs::create_dir_all(sys.join("kvm_pvm")).unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(detect_accel_in(&sys, &dev), Accel::Tcg);
        std::fs::create_dir_all(sys.join("kvm_amd")).unwrap();
        assert_eq!(detect_accel_in(&sys, &dev), Accel::Kvm);
        assert_eq!(detect_accel_in(&sys, &dir.path().join("missing")), Accel::Tcg);
    }

    #[test]
    fn choice_is_lowercase_json() {
        assert_eq!(serde_json::from_str::<AccelChoice>(r#""tcg""#).unwrap(), AccelChoice::Tcg);
        assert!(serde_json::from_str::<AccelChoice>(r#""KVM""#).is_err());
    }
}
