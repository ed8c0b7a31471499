//! Destination admission control and the source-side rate limiter, under the
//! control-plane threats of docs/architecture.md (flood, thrashing, false capacity).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ferry_policy::{Admission, AdmissionConfig, RateLimiter, RefusalKind};
use ferry_types::{HostName, VmName};

fn host(s: &str) -> HostName {
    s.parse().expect("host")
}

fn vm(s: &str) -> VmName {
    s.parse().expect("vm")
}

fn cfg() -> AdmissionConfig {
    AdmissionConfig {
        capacity_memory_mib: 16 * 1024,
        capacity_vcpus: 16,
        max_concurrent_incoming: 4,
        per_peer_max: 1000,
        per_peer_window: Duration::from_secs(60),
        vm_cooldown: Duration::from_secs(300),
    }
}

#[test]
fn flood_of_50_concurrent_offers_admits_exactly_the_limit() {
    let admission = Admission::new(cfg());
    let barrier = Arc::new(Barrier::new(50));
    let now = Instant::now();
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let admission = admission.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let r = admission.try_admit(
                    &host(&format!("peer-{}", i % 5)),
                    &vm(&format!("vm-{i}")),
                    256,
                    1,
                    0,
                    0,
                    now,
                );
                (r, started.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().expect("thread")).collect();
    let mut tickets = Vec::new();
    let mut refusal_latencies = Vec::new();
    for (r, took) in results {
        match r {
            Ok(t) => tickets.push(t),
            Err(refusal) => {
                assert_eq!(refusal.kind, RefusalKind::Concurrency, "{refusal}");
                assert!(
                    refusal.message.contains("4 incoming migrations in flight, limit 4"),
                    "{refusal}"
                );
                refusal_latencies.push(took);
            }
        }
    }
    assert_eq!(tickets.len(), 4);
    assert_eq!(refusal_latencies.len(), 46);
    refusal_latencies.sort();
    println!(
        "flood refusal latency: p50 {:?}, max {:?} (includes lock contention across 50 threads)",
        refusal_latencies[refusal_latencies.len() / 2],
        refusal_latencies[refusal_latencies.len() - 1]
    );
    assert_eq!(admission.in_flight(), (4, 1024, 4));

    // Dropping tickets frees their slots and reservations.
    tickets.truncate(1);
    assert_eq!(admission.in_flight(), (1, 256, 1));
    let again = admission.try_admit(&host("peer-0"), &vm("late"), 256, 1, 0, 0, now);
    assert!(again.is_ok());
    drop(again);
    drop(tickets);
    assert_eq!(admission.in_flight(), (0, 0, 0));
}

#[test]
fn capacity_counts_in_flight_reservations() {
    let admission = Admission::new(cfg());
    let now = Instant::now();
    let p = host("peer");
    // 8 GiB used by running VMs + 6 GiB in flight: 2 GiB left.
    let _t = admission.try_admit(&p, &vm("a"), 6 * 1024, 2, 8 * 1024, 4, now).expect("fits");
    let r = admission
        .try_admit(&p, &vm("b"), 4 * 1024, 1, 8 * 1024, 4, now)
        .expect_err("does not fit once a is counted");
    assert_eq!(r.kind, RefusalKind::Memory);
    for n in ["4096 MiB", "8192 MiB used", "6144 MiB reserved by 1", "leaves 2048 MiB of 16384 MiB"]
    {
        assert!(r.message.contains(n), "missing {n:?}: {r}");
    }
    // Exactly the remainder fits.
    let _t2 = admission.try_admit(&p, &vm("c"), 2 * 1024, 1, 8 * 1024, 4, now).expect("exact fit");

    // vCPUs: 4 used + 3 reserved + 10 > 16.
    let r = admission.try_admit(&p, &vm("d"), 0, 10, 0, 4, now).expect_err("vcpus");
    assert_eq!(r.kind, RefusalKind::Vcpus);
    assert!(r.message.contains("needs 10 vCPUs; 4 used by running VMs + 3 reserved by 2"), "{r}");
    assert!(r.message.contains("leaves 9 of 16"), "{r}");
}

#[test]
fn false_capacity_claim_is_refused_at_accept() {
    // The source believed the destination had room; the destination's own
    // numbers say otherwise, and that is what decides.
    let admission = Admission::new(cfg());
    let r = admission
        .try_admit(&host("src"), &vm("big"), 4096, 2, 15 * 1024, 2, Instant::now())
        .expect_err("no room");
    assert_eq!(r.kind, RefusalKind::Memory);
}

#[test]
fn per_peer_rate_limit() {
    let admission = Admission::new(AdmissionConfig {
        per_peer_max: 3,
        per_peer_window: Duration::from_secs(10),
        ..cfg()
    });
    let t0 = Instant::now();
    let p = host("noisy");
    for i in 0..3 {
        // Tickets dropped at once: the limit is on rate, not concurrency.
        admission
            .try_admit(&p, &vm(&format!("v{i}")), 1, 1, 0, 0, t0 + Duration::from_secs(i))
            .expect("under the limit");
    }
    let r = admission
        .try_admit(&p, &vm("v3"), 1, 1, 0, 0, t0 + Duration::from_secs(4))
        .expect_err("over the limit");
    assert_eq!(r.kind, RefusalKind::PeerRate);
    assert!(r.message.contains("3 migration(s) admitted in the last 10 s (limit 3)"), "{r}");
    assert_eq!(r.retry_after, Some(Duration::from_secs(6)));
    // Another peer is not affected.
    assert!(admission
        .try_admit(&host("quiet"), &vm("q"), 1, 1, 0, 0, t0 + Duration::from_secs(4))
        .is_ok());
    // Once the first admission leaves the window, one more gets in.
    assert!(admission.try_admit(&p, &vm("v3"), 1, 1, 0, 0, t0 + Duration::from_secs(10)).is_ok());
}

#[test]
fn cooldown_after_completion_and_no_duplicate_in_flight() {
    let admission = Admission::new(cfg());
    let t0 = Instant::now();
    let p = host("peer");
    let ticket = admission.try_admit(&p, &vm("web"), 512, 1, 0, 0, t0).expect("first");
    let r =
        admission.try_admit(&p, &vm("web"), 512, 1, 0, 0, t0).expect_err("same VM twice at once");
    assert_eq!(r.kind, RefusalKind::AlreadyInFlight);

    admission.completed(&vm("web"), t0 + Duration::from_secs(5));
    drop(ticket);
    let r = admission
        .try_admit(&p, &vm("web"), 512, 1, 0, 0, t0 + Duration::from_secs(65))
        .expect_err("inside cooldown");
    assert_eq!(r.kind, RefusalKind::Cooldown);
    assert!(r.message.contains("cooldown 300 s, 240.0 s left"), "{r}");
    assert_eq!(r.retry_after, Some(Duration::from_secs(240)));
    assert!(admission
        .try_admit(&p, &vm("web"), 512, 1, 0, 0, t0 + Duration::from_secs(305))
        .is_ok());
}

#[test]
fn outgoing_rate_limiter() {
    let limiter = RateLimiter::new(2, Duration::from_secs(1));
    let t0 = Instant::now();
    assert!(limiter.check("host-b", t0).is_ok());
    assert!(limiter.check("host-b", t0 + Duration::from_millis(100)).is_ok());
    let r = limiter.check("host-b", t0 + Duration::from_millis(200)).expect_err("burst");
    assert_eq!(r.kind, RefusalKind::Rate);
    assert!(r.message.contains("2 request(s) in the last 1 s, limit 2; retry in 0.8 s"), "{r}");
    assert!(limiter.check("host-c", t0 + Duration::from_millis(200)).is_ok());
    assert!(limiter.check("host-b", t0 + Duration::from_millis(1000)).is_ok());
}

#[test]
fn config_serde_defaults_and_units() {
    let c: AdmissionConfig = serde_json::from_str(
        r#"{"capacity_memory_mib": 1024, "per_peer_window": "500ms", "vm_cooldown": 90}"#,
    )
    .expect("parse");
    assert_eq!(c.capacity_memory_mib, 1024);
    assert_eq!(c.per_peer_window, Duration::from_millis(500));
    assert_eq!(c.vm_cooldown, Duration::from_secs(90));
    assert_eq!(c.max_concurrent_incoming, AdmissionConfig::default().max_concurrent_incoming);
    let c2: AdmissionConfig =
        serde_json::from_str(&serde_json::to_string(&c).expect("ser")).expect("de");
    assert_eq!(c, c2);
    assert!(serde_json::from_str::<AdmissionConfig>(r#"{"capacity": 1}"#).is_err());
    assert!(serde_json::from_str::<AdmissionConfig>(r#"{"vm_cooldown": "5 fortnights"}"#).is_err());
    assert!(serde_json::from_str::<AdmissionConfig>(r#"{"vm_cooldown": -1}"#).is_err());
}

/// After a restart the agent puts back what its records say was counted;
/// a fresh limiter or admission with those events refuses as the old one did.
#[test]
fn restored_events_count_as_before_a_restart() {
    let limiter = RateLimiter::new(2, Duration::from_secs(10));
    let t0 = Instant::now();
    // Out of order and more than the limit, as a records directory may hold.
    for s in [3, 1, 2] {
        limiter.restore("host-b", t0 + Duration::from_secs(s));
    }
    let r = limiter.check("host-b", t0 + Duration::from_secs(5)).expect_err("restored limit");
    // The newest two (2 s and 3 s) decide: one leaves the window at 12 s.
    assert_eq!(r.retry_after, Some(Duration::from_secs(7)));
    assert!(limiter.check("host-c", t0 + Duration::from_secs(5)).is_ok(), "other keys unaffected");
    assert!(limiter.check("host-b", t0 + Duration::from_secs(12)).is_ok());

    let admission = Admission::new(AdmissionConfig {
        per_peer_max: 2,
        per_peer_window: Duration::from_secs(10),
        ..cfg()
    });
    admission.restore_peer_admission(&host("noisy"), t0);
    admission.restore_peer_admission(&host("noisy"), t0 + Duration::from_secs(1));
    let r = admission
        .try_admit(&host("noisy"), &vm("v"), 1, 1, 0, 0, t0 + Duration::from_secs(2))
        .expect_err("restored peer window");
    assert_eq!(r.kind, RefusalKind::PeerRate);
    assert!(admission
        .try_admit(&host("noisy"), &vm("v"), 1, 1, 0, 0, t0 + Duration::from_secs(10))
        .is_ok());

    // A cooldown restored from an earlier move is not shortened by it.
    admission.completed(&vm("web"), t0 + Duration::from_secs(100));
    admission.completed(&vm("web"), t0);
    let r = admission
        .try_admit(&host("p"), &vm("web"), 1, 1, 0, 0, t0 + Duration::from_secs(350))
        .expect_err("the later cooldown holds");
    assert_eq!(r.kind, RefusalKind::Cooldown);
}
