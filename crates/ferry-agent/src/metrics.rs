//! Prometheus metrics: counters the agent bumps as migrations run, rendered
//! as Prometheus text (served by crate::metrics_http).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::records::Role;

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
    resolve_settled: AtomicU64,
    resolve_unsettled: AtomicU64,
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

    /// One attempt to settle a migration in doubt (the VM stays paused on
    /// the source while they fail: worth an alert).
    pub fn resolve_attempt(&self, settled: bool) {
        let c = if settled { &self.resolve_settled } else { &self.resolve_unsettled };
        c.fetch_add(1, Ordering::Relaxed);
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
        let _ = writeln!(s, "# HELP ferry_resolve_attempts_total Attempts to settle a migration in doubt, by result.");
        let _ = writeln!(s, "# TYPE ferry_resolve_attempts_total counter");
        for (result, v) in
            [("settled", &self.resolve_settled), ("unsettled", &self.resolve_unsettled)]
        {
            let _ = writeln!(
                s,
                "ferry_resolve_attempts_total{{result=\"{result}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(s, "# HELP ferry_vms VMs this agent runs.");
        let _ = writeln!(s, "# TYPE ferry_vms gauge");
        let _ = writeln!(s, "ferry_vms {vms}");
        let _ = writeln!(s, "# HELP ferry_active_migrations Outgoing migrations in flight.");
        let _ = writeln!(s, "# TYPE ferry_active_migrations gauge");
        let _ = writeln!(s, "ferry_active_migrations {active}");
        s
    }
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
        m.resolve_attempt(false);
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
        assert!(text.contains("ferry_resolve_attempts_total{result=\"unsettled\"} 1"), "{text}");
        assert!(text.contains("ferry_vms 2"));
    }
}
