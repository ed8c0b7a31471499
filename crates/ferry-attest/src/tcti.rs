//! Why no TPM answered at a TCTI, in words a newcomer can act on: tss-esapi
//! only reports "response code not recognized" when the device is missing or
//! nothing listens on the swtpm port.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use crate::AttestError;

/// What was found where the TCTI points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TctiProbe {
    /// `device:PATH` and PATH does not exist.
    DeviceMissing(PathBuf),
    /// `device:PATH` exists but cannot be opened.
    DeviceUnopenable { path: PathBuf, why: String },
    /// `swtpm:host=H,port=P` and nothing accepts connections there.
    PortClosed(String),
    /// The device or port is there; the TPM itself refused.
    Present,
}

/// The device path of a `device:` TCTI, or the `host:port` of a `swtpm:` one.
fn target(tcti: &str) -> Option<Result<PathBuf, String>> {
    if let Some(path) = tcti.strip_prefix("device:") {
        return Some(Ok(PathBuf::from(if path.is_empty() { "/dev/tpm0" } else { path })));
    }
    let conf = tcti.strip_prefix("swtpm:").or_else(|| tcti.strip_prefix("mssim:"))?;
    let mut host = "localhost";
    // tss2's defaults for both simulator TCTIs.
    let mut port = "2321";
    for kv in conf.split(',') {
        match kv.split_once('=') {
            Some(("host", h)) => host = h,
            Some(("port", p)) => port = p,
            _ => {}
        }
    }
    Some(Err(format!("{host}:{port}")))
}

/// Look at what the TCTI points to (file system or one TCP connect).
pub fn probe(tcti: &str) -> TctiProbe {
    match target(tcti) {
        Some(Ok(path)) => match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(_) => TctiProbe::Present,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TctiProbe::DeviceMissing(path),
            Err(e) => TctiProbe::DeviceUnopenable { path, why: e.to_string() },
        },
        Some(Err(addr)) => {
            let open = addr
                .to_socket_addrs()
                .ok()
                .into_iter()
                .flatten()
                .any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok());
            if open {
                TctiProbe::Present
            } else {
                TctiProbe::PortClosed(addr)
            }
        }
        None => TctiProbe::Present,
    }
}

const SWTPM_HINT: &str = "a host without a hardware TPM can use swtpm: start it with \
     `swtpm socket --tpm2 --server type=tcp,port=2321,bindaddr=127.0.0.1 \
     --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 --flags not-need-init,startup-clear ...` \
     and pass --tcti swtpm:host=127.0.0.1,port=2321 (docs/deploy.md, \"A host without a TPM\")";

/// The error for a TCTI no TPM answered at. `tss` is tss-esapi's own
/// message, shown only when the probe found nothing more telling.
pub fn unreachable(tcti: &str, probe: &TctiProbe, tss: &str) -> AttestError {
    let (why, hint) = match probe {
        TctiProbe::DeviceMissing(path) => (
            format!(
                "{} does not exist (no TPM, or its driver tpm_tis / tpm_crb is not loaded)",
                path.display()
            ),
            SWTPM_HINT.to_owned(),
        ),
        TctiProbe::DeviceUnopenable { path, why } => (
            format!("cannot open {}: {why}", path.display()),
            "run as root or as a member of the group that owns the device (often `tss`); \
             /dev/tpm0 admits one process at a time, the resource manager /dev/tpmrm0 many"
                .to_owned(),
        ),
        TctiProbe::PortClosed(addr) => (
            format!("nothing accepts connections on {addr}"),
            format!(
                "start the swtpm first (control port = TPM port + 1), or pass the TCTI of a \
                 running TPM, e.g. --tcti device:/dev/tpmrm0; {}",
                "see docs/deploy.md, \"A host without a TPM\""
            ),
        ),
        TctiProbe::Present => (
            format!("the TPM did not answer ({tss})"),
            "check that nothing else holds the TPM (use the resource manager /dev/tpmrm0, not \
             /dev/tpm0) and that a swtpm was started with --flags not-need-init,startup-clear"
                .to_owned(),
        ),
    };
    AttestError::TpmUnreachable { tcti: tcti.to_owned(), why, hint }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_suggests_swtpm_once() {
        let probe = TctiProbe::DeviceMissing("/dev/tpmrm0".into());
        let msg =
            unreachable("device:/dev/tpmrm0", &probe, "response code not recognized").to_string();
        assert!(msg.contains("/dev/tpmrm0 does not exist"), "{msg}");
        assert!(msg.contains("--tcti swtpm:host=127.0.0.1,port=2321"), "{msg}");
        assert_eq!(msg.matches("device:/dev/tpmrm0").count(), 1, "the TCTI once: {msg}");
        assert!(!msg.contains("response code"), "tss noise hidden: {msg}");
    }

    #[test]
    fn a_closed_swtpm_port_says_where_it_looked() {
        let tcti = "swtpm:host=127.0.0.1,port=1";
        assert_eq!(target(tcti), Some(Err("127.0.0.1:1".into())));
        let msg = unreachable(tcti, &probe(tcti), "x").to_string();
        assert!(msg.contains("nothing accepts connections on 127.0.0.1:1"), "{msg}");
        assert!(msg.contains("control port = TPM port + 1"), "{msg}");
    }

    #[test]
    fn device_paths_are_probed() {
        let p = probe("device:/nonexistent/tpm");
        assert_eq!(p, TctiProbe::DeviceMissing("/nonexistent/tpm".into()));
        assert_eq!(target("device:"), Some(Ok(PathBuf::from("/dev/tpm0"))));
        assert_eq!(target("tabrmd:"), None);
    }
}
