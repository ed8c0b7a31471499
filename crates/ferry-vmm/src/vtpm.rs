//! A VM's vTPM model, which vTPMs a host can give its VMs (found out once
//! at start-up), and the pure decision whether that is enough for a VM. A destination
//! announces its [`VtpmSupport`] to an attested source, which checks it
//! with [`can_host`] before it offers the VM.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long each probe command may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest text kept from a peer's announcement when it is shown.
const MAX_SHOWN: usize = 200;

/// The VM's virtual TPM 2.0: none, or its own swtpm behind one of QEMU's
/// two TPM interfaces. Guest-visible, so it travels in the spec and both
/// ends of a migration build the same device.
/// Encoded as its name; `true` and `false` are read as `crb` and `none`
/// (`tpm = true` in a spec asks for the default model).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TpmModel {
    #[default]
    None,
    /// The Command Response Buffer interface (`tpm-crb`), what TPM 2.0
    /// firmware and modern guests expect.
    Crb,
    /// The FIFO TIS interface (`tpm-tis`), for older guests.
    Tis,
}

impl TpmModel {
    pub const ALL: [TpmModel; 3] = [TpmModel::None, TpmModel::Crb, TpmModel::Tis];

    pub fn name(self) -> &'static str {
        match self {
            TpmModel::None => "none",
            TpmModel::Crb => "crb",
            TpmModel::Tis => "tis",
        }
    }

    /// The QEMU device, or `None` for a VM without a vTPM.
    pub fn qemu_device(self) -> Option<&'static str> {
        match self {
            TpmModel::None => None,
            TpmModel::Crb => Some("tpm-crb"),
            TpmModel::Tis => Some("tpm-tis"),
        }
    }

    pub fn is_none(&self) -> bool {
        *self == TpmModel::None
    }
}

impl fmt::Display for TpmModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TpmModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TpmModel::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            let s: String = s.chars().take(40).collect();
            format!("unknown vTPM model {s:?}: expected one of none, crb, tis (or true, false)")
        })
    }
}

impl<'de> Deserialize<'de> for TpmModel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Model;
        impl serde::de::Visitor<'_> for Model {
            type Value = TpmModel;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a vTPM model: none, crb, tis, true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<TpmModel, E> {
                Ok(if v { TpmModel::Crb } else { TpmModel::None })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TpmModel, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Model)
    }
}

/// What vTPMs a host can host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VtpmSupport {
    /// swtpm's version, when swtpm runs here.
    #[serde(default)]
    pub swtpm: Option<String>,
    /// swtpm emulates TPM 2.0 (the only version Ferry gives VMs).
    #[serde(default)]
    pub tpm2: bool,
    /// The TPM interfaces this host's QEMU offers.
    #[serde(default)]
    pub models: Vec<TpmModel>,
    /// Why this host cannot host a vTPM, when it cannot.
    #[serde(default)]
    pub problem: Option<String>,
}

impl VtpmSupport {
    /// A host that cannot host a vTPM, and why.
    pub fn none(why: impl Into<String>) -> Self {
        Self { problem: Some(why.into()), ..Self::default() }
    }

    /// One line for `ferry status` and logs.
    pub fn summary(&self) -> String {
        match (&self.problem, &self.swtpm) {
            (Some(why), _) => format!("none: {}", shown(why)),
            (None, None) => "none".into(),
            (None, Some(version)) => {
                let models: Vec<&str> = self.models.iter().map(|m| m.name()).collect();
                let tpm = if self.tpm2 { "TPM 2.0" } else { "no TPM 2.0" };
                format!("swtpm {}, {tpm}, {}", shown(version), models.join(", "))
            }
        }
    }
}

/// A peer's text, cut short and stripped of control characters.
fn shown(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_SHOWN).collect()
}

/// Why a host cannot host a VM's vTPM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VtpmShortfall {
    #[error("has no vTPM support: {0}")]
    NoVtpm(String),
    #[error("runs swtpm {0}, which does not emulate TPM 2.0")]
    NoTpm2(String),
    #[error("has no {wanted} TPM interface in its QEMU (it offers: {offered})")]
    NoModel { wanted: TpmModel, offered: String },
}

/// SECURITY: whether a host whose vTPM support is `support` can host a VM
/// whose vTPM is `wanted`. A source checks a destination's announcement
/// before it offers the VM, and the destination checks the Offer again.
pub fn can_host(wanted: TpmModel, support: &VtpmSupport) -> Result<(), VtpmShortfall> {
    if wanted == TpmModel::None {
        return Ok(());
    }
    let Some(version) = &support.swtpm else {
        let why = support.problem.as_deref().unwrap_or("swtpm does not run there");
        return Err(VtpmShortfall::NoVtpm(shown(why)));
    };
    if let Some(why) = &support.problem {
        return Err(VtpmShortfall::NoVtpm(shown(why)));
    }
    if !support.tpm2 {
        return Err(VtpmShortfall::NoTpm2(shown(version)));
    }
    if !support.models.contains(&wanted) {
        let offered: Vec<&str> = support.models.iter().map(|m| m.name()).collect();
        let offered = if offered.is_empty() { "none".into() } else { offered.join(", ") };
        return Err(VtpmShortfall::NoModel { wanted, offered });
    }
    Ok(())
}

/// Find out what this host can host: swtpm's capabilities (its version,
/// TPM 2.0) and the TPM devices and backend of this host's QEMU.
pub async fn probe(swtpm: &Path, qemu: &Path) -> VtpmSupport {
    let caps = match run(swtpm, &["socket", "--print-capabilities"]).await {
        Ok(out) => out,
        Err(why) => return VtpmSupport::none(format!("swtpm ({}) {why}", swtpm.display())),
    };
    let (version, tpm2) = match parse_capabilities(&caps) {
        Ok(v) => v,
        Err(why) => return VtpmSupport::none(format!("swtpm ({}): {why}", swtpm.display())),
    };
    // QEMU 7.2 lists the backends on stderr and exits 1 after `-tpmdev help`.
    let backends = run_for_output(qemu, &["-tpmdev", "help"]).await.unwrap_or_default();
    let devices = run(qemu, &["-device", "help"]).await.unwrap_or_default();
    let mut support = VtpmSupport { swtpm: Some(version), tpm2, ..VtpmSupport::default() };
    if !has_emulator_backend(&backends) {
        support.problem = Some(format!("QEMU ({}) has no tpm-emulator backend", qemu.display()));
        return support;
    }
    support.models = parse_devices(&devices);
    support
}

/// swtpm's version and whether it emulates TPM 2.0, from the JSON of
/// `swtpm socket --print-capabilities`.
pub fn parse_capabilities(json: &str) -> Result<(String, bool), String> {
    #[derive(Deserialize)]
    struct Caps {
        #[serde(default)]
        features: Vec<String>,
        version: Option<String>,
    }
    let caps: Caps = serde_json::from_str(json.trim())
        .map_err(|e| format!("unreadable --print-capabilities output: {e}"))?;
    let version = caps.version.unwrap_or_else(|| "(unknown version)".into());
    Ok((shown(&version), caps.features.iter().any(|f| f == "tpm-2.0")))
}

/// QEMU's `-tpmdev help` lists the tpm-emulator backend (swtpm's client).
pub fn has_emulator_backend(help: &str) -> bool {
    help.lines().any(|l| l.split_whitespace().next() == Some("emulator"))
}

/// The TPM interfaces in QEMU's `-device help`.
pub fn parse_devices(help: &str) -> Vec<TpmModel> {
    TpmModel::ALL
        .into_iter()
        .filter(|m| m.qemu_device().is_some_and(|d| help.contains(&format!("name \"{d}\""))))
        .collect()
}

/// stdout of a successful run.
async fn run(binary: &Path, args: &[&str]) -> Result<String, String> {
    let out = output(binary, args).await?;
    if !out.status.success() {
        return Err(format!("failed ({})", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// stdout and stderr, whatever the exit status.
async fn run_for_output(binary: &Path, args: &[&str]) -> Result<String, String> {
    let out = output(binary, args).await?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(text)
}

async fn output(binary: &Path, args: &[&str]) -> Result<std::process::Output, String> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(PROBE_TIMEOUT, out).await {
        Err(_) => Err(format!("did not answer within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("cannot run: {e}")),
        Ok(Ok(o)) => Ok(o),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn full() -> VtpmSupport {
        VtpmSupport {
            swtpm: Some("0.7.1".into()),
            tpm2: true,
            models: vec![TpmModel::Crb, TpmModel::Tis],
            problem: None,
        }
    }

    #[test]
    fn each_shortfall_is_named() {
        assert_eq!(can_host(TpmModel::Crb, &full()), Ok(()));
        assert_eq!(can_host(TpmModel::None, &VtpmSupport::none("x")), Ok(()), "no vTPM wanted");
        let none = can_host(TpmModel::Crb, &VtpmSupport::none("swtpm: not installed"));
        assert_eq!(none.unwrap_err().to_string(), "has no vTPM support: swtpm: not installed");
        let silent = can_host(TpmModel::Crb, &VtpmSupport::default()).unwrap_err();
        assert!(silent.to_string().contains("swtpm does not run there"), "{silent}");
        let old = VtpmSupport { tpm2: false, ..full() };
        let err = can_host(TpmModel::Tis, &old).unwrap_err().to_string();
        assert_eq!(err, "runs swtpm 0.7.1, which does not emulate TPM 2.0");
        let crb_only = VtpmSupport { models: vec![TpmModel::Crb], ..full() };
        let err = can_host(TpmModel::Tis, &crb_only).unwrap_err().to_string();
        assert_eq!(err, "has no tis TPM interface in its QEMU (it offers: crb)");
        let broken = VtpmSupport { problem: Some("QEMU has no tpm-emulator".into()), ..full() };
        assert!(can_host(TpmModel::Crb, &broken).is_err(), "a named problem wins");
    }

    #[test]
    fn a_peers_text_is_cut_and_cleaned() {
        let long = VtpmSupport::none(format!("a\u{1b}[31m{}", "x".repeat(1000)));
        let err = can_host(TpmModel::Crb, &long).unwrap_err().to_string();
        assert!(!err.contains('\u{1b}') && err.len() < 300, "{err}");
        let extra = r#"{"swtpm":"1","tpm2":true,"models":["crb"],"problem":null,"x":1}"#;
        assert!(serde_json::from_str::<VtpmSupport>(extra).is_err(), "unknown fields refused");
        let bad_model = r#"{"swtpm":"1","tpm2":true,"models":["spapr"]}"#;
        assert!(serde_json::from_str::<VtpmSupport>(bad_model).is_err());
    }

    #[test]
    fn probes_parse_swtpm_and_qemu_output() {
        let caps = r#"{ "type": "swtpm", "features": [ "tpm-1.2", "tpm-2.0", "cmdarg-seccomp" ], "version": "0.7.1" }"#;
        assert_eq!(parse_capabilities(caps), Ok(("0.7.1".into(), true)));
        let v12 = r#"{ "type": "swtpm", "features": [ "tpm-1.2" ], "version": "0.5.0" }"#;
        assert_eq!(parse_capabilities(v12), Ok(("0.5.0".into(), false)));
        assert!(parse_capabilities("swtpm: unknown option").is_err());
        let help =
            "Misc devices:\nname \"tpm-crb\"\nname \"tpm-tis\", bus System\nname \"pvpanic\"";
        assert_eq!(parse_devices(help), [TpmModel::Crb, TpmModel::Tis]);
        assert_eq!(parse_devices("name \"tpm-tis-device\""), []);
        let backends = "Supported TPM types (choose only one):\n passthrough   Passthrough TPM backend driver\n    emulator   TPM emulator backend driver\n";
        assert!(has_emulator_backend(backends));
        assert!(!has_emulator_backend(" passthrough   Passthrough TPM backend driver"));
    }

    #[tokio::test]
    async fn this_hosts_swtpm_and_qemu_host_both_models() {
        let s = probe(Path::new("swtpm"), Path::new("qemu-system-x86_64")).await;
        assert_eq!(s.problem, None, "{s:?}");
        assert!(s.tpm2, "{s:?}");
        assert_eq!(s.models, [TpmModel::Crb, TpmModel::Tis], "{s:?}");
        assert_eq!(can_host(TpmModel::Tis, &s), Ok(()));
    }

    #[tokio::test]
    async fn a_missing_swtpm_is_a_named_problem() {
        let s = probe(Path::new("/nonexistent/swtpm"), Path::new("qemu-system-x86_64")).await;
        let why = s.problem.unwrap();
        assert!(why.contains("/nonexistent/swtpm") && why.contains("cannot run"), "{why}");
    }
}
