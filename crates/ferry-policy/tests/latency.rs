//! Authorization latency over 10k decisions with the example policy set.
//! Prints p50/p99; asserts nothing about time (machines differ), only that
//! the decisions are the expected ones.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ferry_policy::Action;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn authorization_latency_p50_p99() {
    let e = example_engine();
    let mut receive = request(host("host-b"), Action::ReceiveVm, labels("blue", 1));
    receive.labels.anti_affinity = vec!["red".into()];
    receive.resident_on_destination = (0..20).map(|i| resident(&format!("t{i}"))).collect();
    let cases = [
        (request(operator("bob", "operator"), Action::MigrateVm, labels("green", 1)), true),
        (request(operator("bob", "operator"), Action::MigrateVm, labels("blue", 1)), false),
        (request(host("host-a"), Action::SendVm, labels("blue", 3)), false),
        (receive, true),
    ];
    // Warm up caches and lazy statics so the first sample is not an outlier.
    for (r, _) in &cases {
        e.authorize(r);
    }
    let n = 10_000;
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let (req, allow) = &cases[i % cases.len()];
        let t = Instant::now();
        let d = e.authorize(req);
        samples.push(t.elapsed());
        assert_eq!(d.is_allow(), *allow, "{d:?}");
    }
    samples.sort();
    println!(
        "authorize latency over {n} decisions: p50 {:?}, p99 {:?}, max {:?}",
        percentile(&samples, 0.50),
        percentile(&samples, 0.99),
        samples[n - 1]
    );
}
