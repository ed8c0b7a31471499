//! libvirt's API through the libvirt project's own Rust bindings (`virt`).
//! Every call blocks on an RPC to libvirtd: callers run them on a blocking
//! thread. The connection is opened lazily and opened again after libvirtd
//! restarted.

use std::sync::Mutex;

use virt::connect::Connect;
use virt::domain::{Domain, DomainState, MigrateParameters};

use crate::filter::{LIVE, PARALLEL, PEER2PEER, PERSIST_DEST, UNDEFINE_SOURCE};

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt: {what}: {message}")]
    Call { what: String, message: String },
    #[error("libvirt has no domain {0}")]
    NoDomain(String),
}

/// Where a domain stands, as libvirt says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Running,
    Paused,
    ShutOff,
    /// Shutting down, crashed, suspended to RAM, or unknown.
    Other,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::ShutOff => "shut off",
            State::Other => "other",
        }
    }
}

/// A domain libvirt runs (active: running or paused).
#[derive(Debug, Clone)]
pub struct Active {
    pub name: String,
    pub xml: String,
    pub state: State,
}

/// One live p2p migration, as Ferry asks libvirt for it.
#[derive(Debug, Clone)]
pub struct MigrateRequest {
    /// libvirt's daemon-to-daemon URI: the source agent's control socket.
    pub dconnuri: String,
    /// Where QEMU's streams go: the source agent's stream socket.
    pub migrate_uri: String,
    /// QEMU multifd channels, if more than one stream.
    pub parallel_connections: Option<u32>,
    /// Define the domain on the destination and undefine it here, as a
    /// persistent domain moves.
    pub persistent: bool,
}

/// Progress of a domain's current job.
#[derive(Debug, Clone, Default)]
pub struct JobProgress {
    pub data_total: u64,
    pub data_remaining: u64,
    pub data_processed: u64,
    pub dirty_rate: u64,
    pub iterations: u64,
    pub downtime_ms: Option<u64>,
}

pub struct Libvirt {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl Libvirt {
    pub fn new(uri: &str) -> Self {
        // libvirt would otherwise print every error on stderr as well.
        virt::error::clear_error_callback();
        Self { uri: uri.to_owned(), conn: Mutex::new(None) }
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn with<T>(
        &self,
        what: &str,
        f: impl Fn(&Connect) -> Result<T, virt::error::Error>,
    ) -> Result<T, LibvirtError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 0..2 {
            if guard.is_none() {
                let c = Connect::open(Some(&self.uri)).map_err(|e| LibvirtError::Connect {
                    uri: self.uri.clone(),
                    message: e.message().to_owned(),
                })?;
                *guard = Some(c);
            }
            let Some(conn) = guard.as_ref() else { continue };
            match f(conn) {
                Ok(v) => return Ok(v),
                Err(e) if attempt == 0 && !conn.is_alive().unwrap_or(false) => {
                    close_dead(guard.take());
                    let _ = e;
                }
                Err(e) => {
                    return Err(LibvirtError::Call {
                        what: what.to_owned(),
                        message: e.message().to_owned(),
                    })
                }
            }
        }
        Err(LibvirtError::Connect { uri: self.uri.clone(), message: "connection lost".into() })
    }

    fn domain(&self, name: &str) -> Result<Domain, LibvirtError> {
        let found = self.with("looking up a domain", |c| match c.lookup_domain_by_name(name) {
            Ok(d) => Ok(Some(d)),
            Err(e)
                if e.code() == virt::enumutil::Enum::Known(virt::error::ErrorNumber::NoDomain) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        })?;
        found.ok_or_else(|| LibvirtError::NoDomain(name.to_owned()))
    }

    /// The running and paused domains, with their XML.
    pub fn active(&self) -> Result<Vec<Active>, LibvirtError> {
        self.with("listing domains", |c| {
            let mut out = Vec::new();
            for d in c.list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)? {
                // A domain that stopped between the listing and these calls
                // is simply not active any more.
                let (Ok(name), Ok(xml), Ok((state, _))) = (d.name(), d.xml_desc(0), d.state())
                else {
                    continue;
                };
                out.push(Active {
                    name,
                    xml,
                    state: state_of(state.unwrap_or(DomainState::NoState)),
                });
            }
            Ok(out)
        })
    }

    /// The domain's state, or `None` if libvirt does not know it.
    pub fn state(&self, name: &str) -> Result<Option<State>, LibvirtError> {
        match self.domain(name) {
            Ok(d) => {
                let (s, _) = d.state().map_err(|e| call("reading a domain's state", e))?;
                Ok(Some(state_of(s.unwrap_or(DomainState::NoState))))
            }
            Err(LibvirtError::NoDomain(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn xml(&self, name: &str) -> Result<String, LibvirtError> {
        self.domain(name)?.xml_desc(0).map_err(|e| call("reading a domain's XML", e))
    }

    pub fn is_persistent(&self, name: &str) -> Result<bool, LibvirtError> {
        self.domain(name)?.is_persistent().map_err(|e| call("reading a domain's persistence", e))
    }

    /// Run a live p2p migration to completion (blocks for its whole length).
    /// It runs on a connection of its own, so that listing and progress
    /// calls are not queued behind it.
    pub fn migrate(&self, name: &str, req: &MigrateRequest) -> Result<(), LibvirtError> {
        let own = Libvirt::new(&self.uri);
        let d = own.domain(name)?;
        let mut flags = LIVE | PEER2PEER;
        if req.persistent {
            flags |= PERSIST_DEST | UNDEFINE_SOURCE;
        }
        let mut params =
            MigrateParameters { uri: Some(req.migrate_uri.clone()), ..Default::default() };
        if let Some(n) = req.parallel_connections {
            flags |= PARALLEL;
            params.parallel_connections = Some(n as i32);
        }
        d.migrate_to_uri3(Some(&req.dconnuri), params, flags)
            .map_err(|e| call("migrating the domain", e))
    }

    pub fn job(&self, name: &str) -> Result<JobProgress, LibvirtError> {
        let j = job_stats(&self.domain(name)?, 0).map_err(|e| call("reading the job", e))?;
        Ok(JobProgress {
            data_total: j.data_total.unwrap_or(0),
            data_remaining: j.data_remaining.unwrap_or(0),
            data_processed: j.data_processed.unwrap_or(0),
            dirty_rate: j.mem_dirty_rate.unwrap_or(0),
            iterations: j.mem_iteration.unwrap_or(0),
            downtime_ms: j.downtime,
        })
    }

    /// The guest's downtime in the domain's last completed job, if libvirt
    /// kept one. On a migration's destination, libvirt's Finish keeps the
    /// incoming job's statistics (the source's own are gone with its copy).
    pub fn completed_downtime_ms(&self, name: &str) -> Result<Option<u64>, LibvirtError> {
        // KEEP_COMPLETED: libvirt otherwise forgets the statistics once read,
        // and they are the operator's too (`virsh domjobinfo --completed`).
        let completed = virt::sys::VIR_DOMAIN_JOB_STATS_COMPLETED
            | virt::sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED;
        let j = job_stats(&self.domain(name)?, completed)
            .map_err(|e| call("reading the completed job", e))?;
        Ok(j.downtime)
    }

    /// Abort the domain's running job (a migration): libvirt resumes the
    /// domain here if it had paused it. (The bindings lack this call.)
    #[allow(unsafe_code)]
    pub fn abort_job(&self, name: &str) -> Result<(), LibvirtError> {
        let d = self.domain(name)?;
        // SAFETY: `d` owns a live domain reference for the whole call, and
        // virDomainAbortJob takes nothing else.
        let rc = unsafe { virt::sys::virDomainAbortJob(d.as_ptr()) };
        if rc < 0 {
            return Err(call("aborting the job", virt::error::Error::last_error()));
        }
        Ok(())
    }

    pub fn resume(&self, name: &str) -> Result<(), LibvirtError> {
        self.domain(name)?.resume().map_err(|e| call("resuming the domain", e))
    }

    /// Stop a domain at once (libvirt's "destroy"; its definition stays).
    pub fn destroy(&self, name: &str) -> Result<(), LibvirtError> {
        self.domain(name)?.destroy().map_err(|e| call("stopping the domain", e))
    }

    /// Start a defined domain.
    pub fn start(&self, name: &str) -> Result<(), LibvirtError> {
        self.domain(name)?.create().map_err(|e| call("starting the domain", e))
    }

    /// Define a domain from XML and start it (labs and demos).
    pub fn define_and_start(&self, xml: &str) -> Result<String, LibvirtError> {
        let d = self.with("defining a domain", |c| c.define_domain_xml(xml))?;
        d.create().map_err(|e| call("starting the domain", e))?;
        d.name().map_err(|e| call("naming the domain", e))
    }
}

fn call(what: &str, e: virt::error::Error) -> LibvirtError {
    LibvirtError::Call { what: what.to_owned(), message: e.message().to_owned() }
}

fn state_of(s: DomainState) -> State {
    match s {
        DomainState::Running | DomainState::Blocked => State::Running,
        DomainState::Paused => State::Paused,
        DomainState::Shutoff => State::ShutOff,
        _ => State::Other,
    }
}

/// Drop a dead connection. The bindings' `Drop` panics when libvirt refuses to close, which a
/// dead connection may do; that must not take the agent's worker down with it.
fn close_dead(conn: Option<Connect>) {
    if let Some(c) = conn {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(c)));
    }
}

/// `virDomainGetJobStats`, without the bindings' `Domain::job_stats`: that
/// one builds a `Vec` from libvirt's pointer, which is NULL once the job has
/// ended (no parameters), and so aborted the agent polling a migration that
/// libvirt had just failed.
#[allow(unsafe_code)]
fn job_stats(d: &Domain, flags: u32) -> Result<virt::domain::JobStats, virt::error::Error> {
    let (mut kind, mut nparams) = (0, 0);
    let mut params: virt::sys::virTypedParameterPtr = std::ptr::null_mut();
    // SAFETY: `d` owns a live domain reference for the whole call; libvirt
    // writes a malloc'd array of `nparams` parameters (or NULL) to `params`.
    let rc = unsafe {
        virt::sys::virDomainGetJobStats(d.as_ptr(), &mut kind, &mut params, &mut nparams, flags)
    };
    if rc < 0 {
        return Err(virt::error::Error::last_error());
    }
    let copied = match (params.is_null(), usize::try_from(nparams)) {
        (false, Ok(n)) if n > 0 => {
            // SAFETY: libvirt returned `n` initialised parameters at `params`;
            // they are copied out (the conversion below copies their strings
            // too) before libvirt's own free releases the array.
            unsafe { std::slice::from_raw_parts(params, n) }.to_vec()
        }
        _ => Vec::new(),
    };
    let stats = virt::domain::JobStats::from((kind, copied));
    if !params.is_null() {
        // SAFETY: the array and its strings are libvirt's, freed once, here;
        // nothing refers to them any more.
        unsafe { virt::sys::virTypedParamsFree(params, nparams) };
    }
    Ok(stats)
}
