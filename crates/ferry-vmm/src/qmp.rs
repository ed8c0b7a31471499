//! A small QMP client over a unix socket.
//!
//! Hand-written rather than generated because QEMU's schema changes between
//! releases and generated clients (the `qapi` crate follows 9.x) reject
//! QEMU 7.2 replies. Everything here is lenient on input: unknown fields are
//! ignored and unknown enum strings become `Other(..)`. Every line is capped
//! at [`MAX_QMP_LINE`] before parsing, so a misbehaving QEMU cannot make the
//! agent buffer without bound.

use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::VmmError;

/// Longest QMP line accepted. query-migrate and friends are a few KiB.
pub const MAX_QMP_LINE: usize = 1 << 20;
/// Default bound on one command's round trip.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connect + greeting. QEMU serves one client at a time, so a
/// second client otherwise waits silently for the first to leave.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Events kept while nobody drains them; the oldest are dropped beyond this.
const MAX_BUFFERED_EVENTS: usize = 256;

macro_rules! lenient_enum {
    ($(#[$doc:meta])* $ty:ident { $($variant:ident = $s:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(from = "String", into = "String")]
        pub enum $ty {
            $($variant,)*
            /// A value this version of Ferry does not know.
            Other(String),
        }
        impl From<String> for $ty {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($s => $ty::$variant,)*
                    _ => $ty::Other(s),
                }
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                match v {
                    $($ty::$variant => $s.to_owned(),)*
                    $ty::Other(s) => s,
                }
            }
        }
    };
}

lenient_enum!(
    /// QEMU's `RunState` (query-status `status`).
    RunState {
        Debug = "debug", InMigrate = "inmigrate", InternalError = "internal-error",
        IoError = "io-error", Paused = "paused", PostMigrate = "postmigrate",
        PreLaunch = "prelaunch", FinishMigrate = "finish-migrate", RestoreVm = "restore-vm",
        Running = "running", SaveVm = "save-vm", Shutdown = "shutdown",
        Suspended = "suspended", Watchdog = "watchdog", GuestPanicked = "guest-panicked",
        Colo = "colo",
    }
);

lenient_enum!(
    /// QEMU's `MigrationStatus` (query-migrate `status`).
    MigrationState {
        None = "none", Setup = "setup", Cancelling = "cancelling", Cancelled = "cancelled",
        Active = "active", PostcopyActive = "postcopy-active", PostcopyPaused = "postcopy-paused",
        PostcopyRecover = "postcopy-recover", Completed = "completed", Failed = "failed",
        Colo = "colo", PreSwitchover = "pre-switchover", Device = "device",
        WaitUnplug = "wait-unplug",
    }
);

impl Default for MigrationState {
    /// query-migrate omits `status` entirely before any migration.
    fn default() -> Self {
        MigrationState::None
    }
}

impl MigrationState {
    /// No further progress will happen without a new command.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// RAM counters from query-migrate (QEMU's `MigrationStats`), bytes unless noted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    pub transferred: u64,
    pub remaining: u64,
    pub total: u64,
    pub duplicate: u64,
    pub normal: u64,
    pub normal_bytes: u64,
    /// Pages per second dirtied by the guest.
    pub dirty_pages_rate: u64,
    /// Megabits per second.
    pub mbps: f64,
    /// Number of dirty-bitmap syncs: pre-copy iterations.
    pub dirty_sync_count: u64,
    pub postcopy_requests: u64,
    pub page_size: u64,
    pub multifd_bytes: u64,
    pub pages_per_second: u64,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
}

/// query-migrate's reply. Times are milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationStatus {
    pub status: MigrationState,
    pub ram: Option<RamStats>,
    pub total_time: Option<u64>,
    pub downtime: Option<u64>,
    pub expected_downtime: Option<u64>,
    pub setup_time: Option<u64>,
    pub error_desc: Option<String>,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub event: String,
    pub data: Value,
    /// QEMU's timestamp, microseconds since the UNIX epoch, if present.
    pub timestamp_us: Option<u64>,
}

impl QmpEvent {
    fn from_value(v: &Value) -> Option<Self> {
        let event = v.get("event")?.as_str()?.to_owned();
        let ts = v.get("timestamp");
        let field = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64);
        let timestamp_us = match (field("seconds"), field("microseconds")) {
            (Some(s), Some(us)) => Some(s.saturating_mul(1_000_000).saturating_add(us)),
            _ => None,
        };
        Some(QmpEvent { event, data: v.get("data").cloned().unwrap_or(Value::Null), timestamp_us })
    }
}

/// A QMP session in command mode.
#[derive(Debug)]
pub struct Qmp {
    stream: BufReader<UnixStream>,
    /// Bytes of a line not yet terminated; kept across calls so that a
    /// timed-out read never loses data and the stream stays in sync.
    partial: Vec<u8>,
    next_id: u64,
    events: VecDeque<QmpEvent>,
    timeout: Duration,
    version: (u64, u64, u64),
    /// Set after an oversize line or `quit`: the stream is no longer usable.
    broken: bool,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, VmmError> {
        let fut = async {
            let stream = UnixStream::connect(path)
                .await
                .map_err(|e| VmmError::io(format!("connecting to QMP at {path:?}"), e))?;
            let mut qmp = Qmp {
                stream: BufReader::new(stream),
                partial: Vec::new(),
                next_id: 1,
                events: VecDeque::new(),
                timeout: DEFAULT_COMMAND_TIMEOUT,
                version: (0, 0, 0),
                broken: false,
            };
            let greeting = qmp.read_message().await?;
            let Some(hello) = greeting.get("QMP") else {
                return Err(VmmError::QmpProtocol(format!("expected a greeting, got {greeting}")));
            };
            let v = &hello["version"]["qemu"];
            let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            qmp.version = (n("major"), n("minor"), n("micro"));
            Ok(qmp)
        };
        let mut qmp =
            tokio::time::timeout(CONNECT_TIMEOUT, fut).await.map_err(|_| VmmError::Timeout {
                what: format!("QMP greeting on {path:?} (is another client connected?)"),
                after: CONNECT_TIMEOUT,
            })??;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting (major, minor, micro).
    pub fn qemu_version(&self) -> (u64, u64, u64) {
        self.version
    }

    /// Sets the per-command timeout.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Events received so far, oldest first.
    pub fn drain_events(&mut self) -> Vec<QmpEvent> {
        self.events.drain(..).collect()
    }

    /// Reads one complete line (at most [`MAX_QMP_LINE`]) and parses it.
    async fn read_message(&mut self) -> Result<Value, VmmError> {
        if self.broken {
            return Err(VmmError::QmpClosed);
        }
        loop {
            if let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return serde_json::from_slice(&line)
                    .map_err(|e| VmmError::QmpProtocol(format!("bad JSON from QEMU: {e}")));
            }
            if self.partial.len() > MAX_QMP_LINE {
                // Resynchronising would mean trusting the rest of the line;
                // give up on the session instead.
                self.broken = true;
                return Err(VmmError::QmpLineTooLong { max: MAX_QMP_LINE });
            }
            let room = (MAX_QMP_LINE + 1).saturating_sub(self.partial.len()) as u64;
            let n = (&mut self.stream)
                .take(room)
                .read_until(b'\n', &mut self.partial)
                .await
                .map_err(|e| VmmError::io("reading QMP", e))?;
            if n == 0 {
                self.broken = true;
                return Err(VmmError::QmpClosed);
            }
        }
    }

    fn buffer_event(&mut self, v: &Value) {
        if let Some(ev) = QmpEvent::from_value(v) {
            tracing::trace!(event = %ev.event, "QMP event");
            if self.events.len() >= MAX_BUFFERED_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(ev);
        }
    }

    /// Runs one command. A QMP error reply becomes [`VmmError::Qmp`].
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg)
            .map_err(|e| VmmError::QmpProtocol(format!("encoding {command}: {e}")))?;
        line.push(b'\n');
        let timeout = self.timeout;
        let mut sent = false;
        let round_trip = async {
            if self.broken {
                return Err(VmmError::QmpClosed);
            }
            let w = self.stream.get_mut();
            w.write_all(&line).await.map_err(|e| VmmError::io(format!("sending {command}"), e))?;
            sent = true;
            loop {
                let mut v = self.read_message().await?;
                if v.get("event").is_some() {
                    self.buffer_event(&v);
                    continue;
                }
                // Replies to earlier commands that timed out carry their own
                // id; skip them rather than misattribute them.
                if v.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::debug!(reply = %v, "discarding QMP reply for another request");
                    continue;
                }
                if let Some(ret) = v.get_mut("return") {
                    return Ok(ret.take());
                }
                if let Some(err) = v.get("error") {
                    let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                    return Err(VmmError::Qmp {
                        command: command.to_owned(),
                        class: s("class"),
                        desc: s("desc"),
                    });
                }
                return Err(VmmError::QmpProtocol(format!("unexpected reply to {command}: {v}")));
            }
        };
        let result = tokio::time::timeout(timeout, round_trip).await;
        result.unwrap_or_else(|_| {
            // A half-written command would corrupt the next one; a fully
            // written one is harmless since its late reply has its own id.
            if !sent {
                self.broken = true;
            }
            Err(VmmError::Timeout { what: format!("QMP {command}"), after: timeout })
        })
    }

    /// Waits for an event named `name`, returning (and removing) the first
    /// buffered one if it already arrived.
    pub async fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<QmpEvent, VmmError> {
        if let Some(i) = self.events.iter().position(|e| e.event == name) {
            if let Some(ev) = self.events.remove(i) {
                return Ok(ev);
            }
        }
        let wait = async {
            loop {
                let v = self.read_message().await?;
                match QmpEvent::from_value(&v) {
                    Some(ev) if ev.event == name => return Ok(ev),
                    Some(_) => self.buffer_event(&v),
                    None => tracing::debug!(reply = %v, "discarding stray QMP reply"),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| VmmError::Timeout { what: format!("QMP event {name}"), after: timeout })?
    }

    /// `query-status`.
    pub async fn status(&mut self) -> Result<RunState, VmmError> {
        let v = self.execute("query-status", None).await?;
        match v.get("status").and_then(Value::as_str) {
            Some(s) => Ok(RunState::from(s.to_owned())),
            None => Err(VmmError::QmpProtocol(format!("query-status without status: {v}"))),
        }
    }

    /// `cont`. On a migration destination started with `-S` this starts the
    /// guest. Beware: on a migration *source* in `postmigrate` QEMU 7.2
    /// accepts `cont` and resumes the old copy of the guest, so the agent
    /// must only do that after the destination is known not to have run.
    pub async fn cont(&mut self) -> Result<(), VmmError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `stop`: pause the guest.
    pub async fn stop(&mut self) -> Result<(), VmmError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `quit`: QEMU exits (removing its sockets and pid file). The session
    /// is unusable afterwards; QEMU closing it first is not an error.
    pub async fn quit(&mut self) -> Result<(), VmmError> {
        let r = self.execute("quit", None).await;
        self.broken = true;
        match r {
            Ok(_) | Err(VmmError::QmpClosed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate-set-parameters` for bandwidth (bytes/s) and downtime limit.
    /// QEMU 7.2 defaults to 32 MiB/s, so this is needed before every migration.
    pub async fn set_migration_parameters(
        &mut self,
        max_bandwidth: u64,
        downtime_limit_ms: u64,
    ) -> Result<(), VmmError> {
        // The link's cap holds after a switch to post-copy too.
        let args = json!({
            "max-bandwidth": max_bandwidth,
            "max-postcopy-bandwidth": max_bandwidth,
            "downtime-limit": downtime_limit_ms,
        });
        self.execute("migrate-set-parameters", Some(args)).await.map(drop)
    }

    /// Current migration capabilities (`query-migrate-capabilities`).
    pub async fn capabilities(&mut self) -> Result<Vec<(String, bool)>, VmmError> {
        let v = self.execute("query-migrate-capabilities", None).await?;
        let list =
            v.as_array().ok_or_else(|| VmmError::QmpProtocol(format!("capabilities: {v}")))?;
        Ok(list
            .iter()
            .filter_map(|c| {
                Some((c.get("capability")?.as_str()?.to_owned(), c.get("state")?.as_bool()?))
            })
            .collect())
    }

    /// `migrate-set-capabilities`. Refuses to end up with both `postcopy-ram`
    /// and `multifd` on: that combination crashes the destination QEMU 7.2.
    pub async fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), VmmError> {
        let mut merged = self.capabilities().await?;
        for (name, state) in caps {
            match merged.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = *state,
                None => merged.push(((*name).to_owned(), *state)),
            }
        }
        let on = |n: &str| merged.iter().any(|(m, s)| m == n && *s);
        if on("postcopy-ram") && on("multifd") {
            return Err(VmmError::UnsafeCapabilities(
                "postcopy-ram together with multifd crashes QEMU 7.2 destinations",
            ));
        }
        let list: Vec<Value> =
            caps.iter().map(|(n, s)| json!({ "capability": n, "state": s })).collect();
        self.execute("migrate-set-capabilities", Some(json!({ "capabilities": list })))
            .await
            .map(drop)
    }

    /// Starts an outgoing migration to `uri` (e.g. `unix:/path`, `tcp:h:p`).
    pub async fn migrate(&mut self, uri: &str) -> Result<(), VmmError> {
        self.execute("migrate", Some(json!({ "uri": uri }))).await.map(drop)
    }

    /// On a `-incoming defer` QEMU: starts listening on `uri`.
    pub async fn migrate_incoming(&mut self, uri: &str) -> Result<(), VmmError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri }))).await.map(drop)
    }

    /// Cancels an outgoing migration; the source keeps running.
    /// Post-copy recovery, source side: resume a paused post-copy over a new channel.
    pub async fn migrate_resume(&mut self, uri: &str) -> Result<(), VmmError> {
        self.execute("migrate", Some(json!({ "uri": uri, "resume": true }))).await.map(drop)
    }

    /// Post-copy recovery, destination side: listen for the resumed stream.
    pub async fn migrate_recover(&mut self, uri: &str) -> Result<(), VmmError> {
        self.execute("migrate-recover", Some(json!({ "uri": uri }))).await.map(drop)
    }

    pub async fn migrate_cancel(&mut self) -> Result<(), VmmError> {
        self.execute("migrate_cancel", None).await.map(drop)
    }

    /// `query-migrate`.
    pub async fn query_migrate(&mut self) -> Result<MigrationStatus, VmmError> {
        let v = self.execute("query-migrate", None).await?;
        serde_json::from_value(v).map_err(|e| VmmError::QmpProtocol(format!("query-migrate: {e}")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn enums_are_lenient() {
        assert_eq!(
            serde_json::from_str::<RunState>(r#""postmigrate""#).unwrap(),
            RunState::PostMigrate
        );
        assert_eq!(
            serde_json::from_str::<RunState>(r#""brand-new""#).unwrap(),
            RunState::Other("brand-new".into())
        );
        assert_eq!(
            serde_json::from_str::<MigrationState>(r#""postcopy-active""#).unwrap(),
            MigrationState::PostcopyActive
        );
    }

    #[test]
    fn query_migrate_parses_unknown_fields_and_missing_status() {
        let empty: MigrationStatus = serde_json::from_value(json!({})).unwrap();
        assert_eq!(empty.status, MigrationState::None);
        let v = json!({
            "status": "completed", "total-time": 120, "downtime": 8, "setup-time": 1,
            "blocked": false, "some-future-field": {"x": 1},
            "ram": {"transferred": 10, "remaining": 0, "total": 268_435_456, "mbps": 1234.5,
                    "dirty-sync-count": 3, "dirty-pages-rate": 0, "new-counter": 7}
        });
        let st: MigrationStatus = serde_json::from_value(v).unwrap();
        assert_eq!(st.status, MigrationState::Completed);
        let ram = st.ram.unwrap();
        assert_eq!((ram.total, ram.dirty_sync_count), (268_435_456, 3));
        assert_eq!(st.downtime, Some(8));
    }

    #[test]
    fn events_keep_timestamps() {
        let v = json!({"event": "STOP", "timestamp": {"seconds": 2, "microseconds": 5}});
        let ev = QmpEvent::from_value(&v).unwrap();
        assert_eq!((ev.event.as_str(), ev.timestamp_us), ("STOP", Some(2_000_005)));
        assert_eq!(ev.data, Value::Null);
    }

    /// A fake QEMU that answers the second command only after the client
    /// gave up: the late reply must be skipped, not taken as the third's.
    #[tokio::test]
    async fn late_replies_are_not_misattributed() {
        use tokio::io::AsyncBufReadExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut s = BufReader::new(s);
            s.get_mut().write_all(b"{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}}}}\n").await.unwrap();
            let mut line = String::new();
            for id in 1..=3u64 {
                line.clear();
                s.read_line(&mut line).await.unwrap();
                let req: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(req["id"], id);
                if id == 2 {
                    continue; // answered late, below
                }
                if id == 3 {
                    let late = json!({"return": "late", "id": 2}).to_string() + "\n";
                    let ev = json!({"event": "STOP"}).to_string() + "\n";
                    s.get_mut().write_all(late.as_bytes()).await.unwrap();
                    s.get_mut().write_all(ev.as_bytes()).await.unwrap();
                }
                let reply = json!({"return": {"n": id}, "id": id}).to_string() + "\n";
                s.get_mut().write_all(reply.as_bytes()).await.unwrap();
            }
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(qmp.qemu_version(), (7, 2, 0));
        qmp.set_timeout(Duration::from_millis(100));
        let err = qmp.execute("slow", None).await.unwrap_err();
        assert!(matches!(err, VmmError::Timeout { .. }), "{err}");
        assert_eq!(qmp.execute("fast", None).await.unwrap(), json!({"n": 3}));
        assert_eq!(qmp.drain_events().len(), 1);
        server.await.unwrap();
    }

    /// A fake QEMU that sends one oversize line: the client must refuse it
    /// without buffering the whole thing.
    #[tokio::test]
    async fn oversize_lines_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let big = vec![b' '; MAX_QMP_LINE + 10];
            let _ = s.write_all(b"{\"QMP\":").await;
            let _ = s.write_all(&big).await;
        });
        let err = Qmp::connect(&path).await.unwrap_err();
        assert!(matches!(err, VmmError::QmpLineTooLong { .. }), "{err}");
        server.abort();
    }
}
