//! The destination's confinement of libvirt's daemon-to-daemon connection.
//! That connection is read-write libvirt API on this host; a source may use
//! it for one thing only, the migration the signed Offer describes. Every
//! message the source sends is judged whole, before libvirtd sees a byte.

use ferry_vmm::VmSpec;

use crate::domain::DomainFacts;
use crate::rpc::{FrameError, Header, MessageType, KEEPALIVE_PROGRAM, REMOTE_PROGRAM};
use crate::xdr::{Decoder, Param, ParamValue, XdrError};

/// Procedures the source may call, with the reason each is needed (traced
/// from a real `virDomainMigrateToURI3` p2p migration, libvirt 9.0).
pub const ALLOWED: &[(u32, i32, &str, &str)] = &[
    (REMOTE_PROGRAM, 66, "AUTH_LIST", "the client asks which authentication the daemon wants"),
    (REMOTE_PROGRAM, 1, "CONNECT_OPEN", "opens the qemu:///system driver; any other URI is refused"),
    (
        REMOTE_PROGRAM,
        60,
        "CONNECT_SUPPORTS_FEATURE",
        "the source checks that the destination speaks p2p, migration v3 and typed parameters",
    ),
    (
        REMOTE_PROGRAM,
        360,
        "CONNECT_REGISTER_CLOSE_CALLBACK",
        "libvirt notices a connection lost mid-migration (and fails the job)",
    ),
    (
        REMOTE_PROGRAM,
        PREPARE,
        "DOMAIN_MIGRATE_PREPARE3_PARAMS",
        "starts the incoming QEMU, paused: once, for the Offer's domain, on this migration's socket",
    ),
    (
        REMOTE_PROGRAM,
        FINISH,
        "DOMAIN_MIGRATE_FINISH3_PARAMS",
        "resumes the incoming domain or kills it: once, after Prepare, for the Offer's domain",
    ),
    (REMOTE_PROGRAM, 361, "CONNECT_UNREGISTER_CLOSE_CALLBACK", "the source's tidy-up"),
    (REMOTE_PROGRAM, 2, "CONNECT_CLOSE", "the source's tidy-up"),
    (KEEPALIVE_PROGRAM, 1, "PING", "libvirt's keepalive: a silent peer is a dead peer"),
    (KEEPALIVE_PROGRAM, 2, "PONG", "libvirt's keepalive answer"),
];

/// libvirt's `VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS`: QEMU's multifd
/// channels.
const PARALLEL_CONNECTIONS: &str = "parallel.connections";
const PREPARE: i32 = 303;
const FINISH: i32 = 306;
const CONNECT_OPEN: i32 = 1;
/// The only driver a migration may open.
const DRIVER_URI: &str = "qemu:///system";

/// `virDomainMigrateFlags` a Ferry migration may carry. Refused among
/// others: TUNNELLED (VM data inside this connection), NON_SHARED_DISK/INC
/// (storage copied over libvirt's own NBD connection, outside Ferry),
/// OFFLINE, POSTCOPY and TLS (QEMU's own transport).
const ALLOWED_FLAGS: u32 = LIVE
    | PEER2PEER
    | PERSIST_DEST
    | UNDEFINE_SOURCE
    | PAUSED
    | CHANGE_PROTECTION
    | ABORT_ON_ERROR
    | AUTO_CONVERGE
    | PARALLEL;
pub const LIVE: u32 = 1;
pub const PEER2PEER: u32 = 2;
pub const PERSIST_DEST: u32 = 8;
pub const UNDEFINE_SOURCE: u32 = 16;
const PAUSED: u32 = 32;
const CHANGE_PROTECTION: u32 = 256;
const ABORT_ON_ERROR: u32 = 4096;
const AUTO_CONVERGE: u32 = 8192;
pub const PARALLEL: u32 = 131072;

/// What the signed Offer says this migration's Prepare must carry.
#[derive(Debug, Clone)]
pub struct Expected {
    pub spec: VmSpec,
    /// The migration's own socket, e.g. `unix:///run/ferry/<id>/mig.sock`.
    pub migrate_uri: String,
    /// QEMU multifd channels (`--streams N` means N - 1), if any.
    pub parallel_connections: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("libvirt program {program:#x} procedure {procedure} is not part of a migration")]
    Procedure { program: u32, procedure: i32 },
    #[error("a libvirt {kind:?} message from the source (only calls and keepalives may come)")]
    Kind { kind: MessageType },
    #[error("{procedure}: {why}")]
    Checked { procedure: &'static str, why: String },
    #[error("{procedure} is malformed")]
    Xdr {
        procedure: &'static str,
        #[source]
        source: XdrError,
    },
}

/// A message let through, and what the audit log should know of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Passed {
    pub procedure: &'static str,
    /// A Prepare's domain XML, as checked.
    pub prepared_xml: Option<String>,
}

#[derive(Debug)]
pub struct ControlFilter {
    expected: Expected,
    prepared: bool,
    finished: bool,
}

impl ControlFilter {
    pub fn new(expected: Expected) -> Self {
        Self { expected, prepared: false, finished: false }
    }

    /// Judge one whole message from the source.
    pub fn judge(&mut self, message: &[u8]) -> Result<Passed, Refused> {
        let h = Header::parse(message).ok_or(FrameError::TooShort { len: message.len() })?;
        let Some(&(_, _, name, _)) =
            ALLOWED.iter().find(|(p, n, _, _)| *p == h.program && *n == h.procedure)
        else {
            return Err(Refused::Procedure { program: h.program, procedure: h.procedure });
        };
        let expected_kind =
            if h.program == KEEPALIVE_PROGRAM { MessageType::Message } else { MessageType::Call };
        if h.kind != expected_kind || h.status != 0 {
            return Err(Refused::Kind { kind: h.kind });
        }
        let body = &message[crate::rpc::HEADER_LEN..];
        let checked = |why: String| Refused::Checked { procedure: name, why };
        let xdr = |source| Refused::Xdr { procedure: name, source };
        let mut prepared_xml = None;
        match (h.program, h.procedure) {
            (REMOTE_PROGRAM, CONNECT_OPEN) => {
                let mut d = Decoder::new(body);
                let uri = d.optional_string("the URI").map_err(xdr)?;
                if uri.as_deref() != Some(DRIVER_URI) {
                    return Err(checked(format!("opens {uri:?}; only {DRIVER_URI} may be opened")));
                }
            }
            (REMOTE_PROGRAM, PREPARE) => {
                if self.prepared {
                    return Err(checked("a second Prepare in one migration".into()));
                }
                prepared_xml = Some(self.check_prepare(body).map_err(|e| match e {
                    Check::Xdr(source) => xdr(source),
                    Check::Why(why) => checked(why),
                })?);
                self.prepared = true;
            }
            (REMOTE_PROGRAM, FINISH) => {
                if !self.prepared || self.finished {
                    return Err(checked("Finish without exactly one Prepare before it".into()));
                }
                self.check_finish(body).map_err(|e| match e {
                    Check::Xdr(source) => xdr(source),
                    Check::Why(why) => checked(why),
                })?;
                self.finished = true;
            }
            _ => {}
        }
        Ok(Passed { procedure: name, prepared_xml })
    }

    fn check_prepare(&self, body: &[u8]) -> Result<String, Check> {
        let mut d = Decoder::new(body);
        let params = d.params()?;
        let _cookie = d.opaque("the cookie")?;
        let flags = d.u32("the flags")?;
        self.check_flags(flags)?;
        let mut xml = None;
        let mut uri = None;
        let mut parallel = None;
        for Param { field, value } in &params {
            match (field.as_str(), value) {
                ("destination_xml", ParamValue::String(s)) => xml = Some(s.clone()),
                ("persistent_xml", ParamValue::String(s)) => self.check_xml(s)?,
                ("migrate_uri", ParamValue::String(s)) => uri = Some(s.clone()),
                ("destination_name", ParamValue::String(s)) => self.check_name(s)?,
                ("bandwidth", ParamValue::ULLong(_)) => {}
                (PARALLEL_CONNECTIONS, ParamValue::Int(n)) => parallel = Some(*n),
                (field, _) => {
                    return Err(Check::Why(format!("parameter {field:?} is not allowed")));
                }
            }
        }
        // SECURITY: QEMU opens exactly the channels the Offer announced, so
        // each one the source carries is one the destination expects.
        if parallel.map(|n| u32::try_from(n).ok()) != self.expected.parallel_connections.map(Some) {
            return Err(Check::Why(format!(
                "{parallel:?} parallel connections; the Offer says {:?}",
                self.expected.parallel_connections
            )));
        }
        if uri.as_deref() != Some(self.expected.migrate_uri.as_str()) {
            return Err(Check::Why(format!(
                "migrate URI {uri:?}; this migration's socket is {}",
                self.expected.migrate_uri
            )));
        }
        let xml = xml.ok_or_else(|| Check::Why("no destination_xml".into()))?;
        self.check_xml(&xml)?;
        Ok(xml)
    }

    fn check_finish(&self, body: &[u8]) -> Result<(), Check> {
        let mut d = Decoder::new(body);
        let params = d.params()?;
        let _cookie = d.opaque("the cookie")?;
        self.check_flags(d.u32("the flags")?)?;
        for Param { field, value } in &params {
            match (field.as_str(), value) {
                ("destination_name", ParamValue::String(s)) => self.check_name(s)?,
                ("destination_xml" | "persistent_xml", ParamValue::String(s)) => {
                    self.check_xml(s)?
                }
                ("migrate_uri", ParamValue::String(s)) if *s == self.expected.migrate_uri => {}
                ("bandwidth", ParamValue::ULLong(_)) | (PARALLEL_CONNECTIONS, _) => {}
                (field, _) => {
                    return Err(Check::Why(format!("parameter {field:?} is not allowed")));
                }
            }
        }
        Ok(())
    }

    fn check_flags(&self, flags: u32) -> Result<(), Check> {
        let extra = flags & !ALLOWED_FLAGS;
        if extra != 0 {
            return Err(Check::Why(format!("migration flags {extra:#x} are not allowed")));
        }
        if flags & PARALLEL != 0 && self.expected.parallel_connections.is_none() {
            return Err(Check::Why("parallel connections the Offer did not announce".into()));
        }
        Ok(())
    }

    fn check_name(&self, name: &str) -> Result<(), Check> {
        if name != self.expected.spec.name.as_str() {
            return Err(Check::Why(format!(
                "domain {name:?}, but the Offer is for {}",
                self.expected.spec.name
            )));
        }
        Ok(())
    }

    /// SECURITY: the definition libvirt would launch must be the domain the
    /// source signed for (name, UUID, memory, vCPUs, machine), which this
    /// host's policy and admission already decided on.
    fn check_xml(&self, xml: &str) -> Result<(), Check> {
        let spec = DomainFacts::parse(xml)
            .and_then(|d| d.spec())
            .map_err(|e| Check::Why(format!("the domain XML: {e}")))?;
        if spec != self.expected.spec {
            return Err(Check::Why(format!(
                "the domain XML describes {} ({} MiB, {} vCPUs, {:?}, {:?}); the Offer signed {} \
                 ({} MiB, {} vCPUs, {:?}, {:?})",
                spec.name,
                spec.memory_mib,
                spec.vcpus,
                spec.machine,
                spec.boot,
                self.expected.spec.name,
                self.expected.spec.memory_mib,
                self.expected.spec.vcpus,
                self.expected.spec.machine,
                self.expected.spec.boot
            )));
        }
        Ok(())
    }
}

enum Check {
    Xdr(XdrError),
    Why(String),
}

impl From<XdrError> for Check {
    fn from(e: XdrError) -> Self {
        Check::Xdr(e)
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
