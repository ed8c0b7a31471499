//! Prometheus metrics: counters the agent bumps as migrations run, served
//! as text on an optional plain-HTTP listener (bind it to loopback or a
//! management network: it exposes counts, never VM data or secrets).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::records::Role;

/// Longest HTTP request head read from a scraper.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

#[derive(Default)]
pub struct Metrics {
    /// (role, outcome) -> count
    outcomes: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// reason -> count of offers or connections refused
    refusals: Mutex<BTreeMap<String, u64>>,
    bytes_source: AtomicU64,
    bytes_destination: AtomicU64,
    duration_ms_source: AtomicU64,
    duration_ms_destination: AtomicU64,
    tls_failures: AtomicU64,
    attestation_failures: AtomicU64,
    postcopy_recovery_failures: AtomicU64,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

impl Metrics {
    pub fn migration_finished(&self, role: Role, outcome: &str, bytes: u64, duration: Duration) {
        if let Ok(mut m) = self.outcomes.lock() {
            *m.entry((role_name(role), outcome.to_owned())).or_default() += 1;
        }
        let (b, d) = match role {
            Role::Source => (&self.bytes_source, &self.duration_ms_source),
            Role::Destination => (&self.bytes_destination, &self.duration_ms_destination),
        };
        b.fetch_add(bytes, Ordering::Relaxed);
        d.fetch_add(duration.as_millis() as u64, Ordering::Relaxed);
    }

    /// A refusal, by a short stable reason ("replay", "binding", "policy", ...).
    pub fn refused(&self, reason: &str) {
        if let Ok(mut m) = self.refusals.lock() {
            // Reasons are a closed set chosen by the agent, never peer text,
            // so the label set stays bounded.
            *m.entry(reason.to_owned()).or_default() += 1;
        }
    }

    pub fn tls_failure(&self) {
        self.tls_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn attestation_failure(&self) {
        self.attestation_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// An attempt to resume an interrupted post-copy failed (the VM stays
    /// stalled on the destination meanwhile: worth an alert).
    pub fn postcopy_recovery_failure(&self) {
        self.postcopy_recovery_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, vms: usize, active: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# HELP ferry_migrations_total Migrations that ended, by role and outcome."
        );
        let _ = writeln!(s, "# TYPE ferry_migrations_total counter");
        if let Ok(m) = self.outcomes.lock() {
            for ((role, outcome), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "ferry_migrations_total{{role=\"{role}\",outcome=\"{outcome}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP ferry_migration_bytes_total VM state bytes moved by finished migrations."
        );
        let _ = writeln!(s, "# TYPE ferry_migration_bytes_total counter");
        let _ = writeln!(
            s,
            "ferry_migration_bytes_total{{role=\"source\"}} {}",
            self.bytes_source.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "ferry_migration_bytes_total{{role=\"destination\"}} {}",
            self.bytes_destination.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP ferry_migration_duration_seconds_total Time spent in finished migrations."
        );
        let _ = writeln!(s, "# TYPE ferry_migration_duration_seconds_total counter");
        for (role, v) in
            [("source", &self.duration_ms_source), ("destination", &self.duration_ms_destination)]
        {
            let _ = writeln!(
                s,
                "ferry_migration_duration_seconds_total{{role=\"{role}\"}} {:.3}",
                v.load(Ordering::Relaxed) as f64 / 1000.0
            );
        }
        let _ =
            writeln!(s, "# HELP ferry_refusals_total Offers and connections refused, by reason.");
        let _ = writeln!(s, "# TYPE ferry_refusals_total counter");
        if let Ok(m) = self.refusals.lock() {
            for (reason, n) in m.iter() {
                let _ = writeln!(s, "ferry_refusals_total{{reason=\"{reason}\"}} {n}");
            }
        }
        let _ = writeln!(s, "# HELP ferry_tls_handshake_failures_total TLS handshakes that failed (unauthenticated or invalid peers).");
        let _ = writeln!(s, "# TYPE ferry_tls_handshake_failures_total counter");
        let _ = writeln!(
            s,
            "ferry_tls_handshake_failures_total {}",
            self.tls_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP ferry_attestation_failures_total Peer platforms that failed attestation."
        );
        let _ = writeln!(s, "# TYPE ferry_attestation_failures_total counter");
        let _ = writeln!(
            s,
            "ferry_attestation_failures_total {}",
            self.attestation_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(s, "# HELP ferry_postcopy_recovery_failures_total Failed attempts to resume an interrupted post-copy.");
        let _ = writeln!(s, "# TYPE ferry_postcopy_recovery_failures_total counter");
        let _ = writeln!(
            s,
            "ferry_postcopy_recovery_failures_total {}",
            self.postcopy_recovery_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(s, "# HELP ferry_vms VMs this agent runs.");
        let _ = writeln!(s, "# TYPE ferry_vms gauge");
        let _ = writeln!(s, "ferry_vms {vms}");
        let _ = writeln!(s, "# HELP ferry_active_migrations Outgoing migrations in flight.");
        let _ = writeln!(s, "# TYPE ferry_active_migrations gauge");
        let _ = writeln!(s, "ferry_active_migrations {active}");
        s
    }
}

/// Serve `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(agent: Arc<crate::Agent>, listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else { continue };
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut head = vec![0u8; MAX_REQUEST_HEAD];
            let n = match tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let first = String::from_utf8_lossy(&head[..n]);
            let (status, body) =
                if first.starts_with("GET /metrics ") || first.starts_with("GET /metrics?") {
                    let vms = agent.vms.lock().await.len();
                    let active = agent.active.lock().await.len();
                    ("200 OK", agent.metrics.render(vms, active))
                } else {
                    ("404 Not Found", "try /metrics\n".to_owned())
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(resp.as_bytes()).await;
        });
    }
}

/// Bind the metrics listener named in the config.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_as_prometheus_text() {
        let m = Metrics::default();
        m.migration_finished(Role::Source, "completed", 1000, Duration::from_millis(1500));
        m.migration_finished(Role::Source, "completed", 24, Duration::from_millis(500));
        m.refused("replay");
        m.postcopy_recovery_failure();
        let text = m.render(2, 1);
        assert!(
            text.contains("ferry_migrations_total{role=\"source\",outcome=\"completed\"} 2"),
            "{text}"
        );
        assert!(text.contains("ferry_migration_bytes_total{role=\"source\"} 1024"), "{text}");
        assert!(
            text.contains("ferry_migration_duration_seconds_total{role=\"source\"} 2.000"),
            "{text}"
        );
        assert!(text.contains("ferry_refusals_total{reason=\"replay\"} 1"), "{text}");
        assert!(text.contains("ferry_postcopy_recovery_failures_total 1"), "{text}");
        assert!(text.contains("ferry_vms 2"));
    }
}
