//! Fuzz entry points (`fuzz/` calls these; the unit tests below run them
//! on a few inputs): everything a source or a destination QEMU sends that
//! this crate decodes.

use crate::filter::{ControlFilter, Expected};
use crate::return_path::ReturnPathScanner;
use crate::rpc::{Framer, LIBVIRT_MESSAGE_MAX};
use crate::DomainFacts;

const XML: &str = "<domain type='qemu'><name>fuzz</name>\
    <uuid>5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f</uuid><memory unit='KiB'>131072</memory>\
    <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os></domain>";

/// Bytes of a control connection, framed and judged message by message
/// (a refusal ends the connection, as in the agent); the same bytes as a
/// return path; and as domain XML.
pub fn control(data: &[u8]) {
    if let Some(spec) = DomainFacts::parse(XML).ok().and_then(|f| f.spec().ok()) {
        let expected = Expected {
            spec,
            migrate_uri: "unix:///run/ferry/x/mig.sock".into(),
            parallel_connections: None,
        };
        let mut filter = ControlFilter::new(expected);
        let mut framer = Framer::new(LIBVIRT_MESSAGE_MAX);
        framer.push(data);
        while let Ok(Some(message)) = framer.next_message() {
            if filter.judge(&message).is_err() {
                break;
            }
        }
    }
    let _ = ReturnPathScanner::default().push(data);
    if let Ok(facts) = DomainFacts::parse(&String::from_utf8_lossy(data)) {
        let _ = facts.spec();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn odd_inputs_do_not_panic() {
        for input in [&b""[..], &[0xff; 64], &[0, 0, 0, 28, 0x20, 0, 0x80, 0x86], b"<domain/>"] {
            super::control(input);
        }
    }
}
