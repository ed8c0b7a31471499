//! Measurements: append latency (write + fdatasync) and verification
//! throughput. Run with `--nocapture` to see the figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{cluster, migrate};
use ferry_audit::{cross_check, verify_log, AuditEvent, AuditLog, Signed};

#[test]
fn measure_append_and_verify() {
    let c = cluster();
    let path = c.path("bench.log");
    let mut log = AuditLog::open(&path, c.src_signer()).unwrap();
    let n = 300;
    let mut lat: Vec<Duration> = Vec::with_capacity(n);
    for i in 0..n {
        let mut ev = AuditEvent::new("commit_sent");
        ev.migration_id = Some(format!("m-{i}"));
        ev.detail = serde_json::json!({ "bytes": 1u64 << 30, "streams": 4 });
        ev.signed = Some(Signed::sign("note", &ev.detail, log.signer()).unwrap());
        let t = Instant::now();
        log.append(&ev).unwrap();
        lat.push(t.elapsed());
    }
    drop(log);
    lat.sort();
    let pct = |p: usize| lat[(lat.len() * p / 100).min(lat.len() - 1)];
    eprintln!(
        "append (sign + write + fdatasync, ~1.3 KiB record with embedded message): p50 {:?}  p90 {:?}  p99 {:?}  max {:?}",
        pct(50),
        pct(90),
        pct(99),
        lat[lat.len() - 1]
    );

    let t = Instant::now();
    let s = verify_log(&path, &c.ca).unwrap();
    let el = t.elapsed();
    let bytes = std::fs::metadata(&path).unwrap().len();
    eprintln!(
        "verify_log: {} records ({} KiB) in {:?} = {:.0} records/s (each: record signature + embedded message signature and chain)",
        s.records,
        bytes / 1024,
        el,
        s.records as f64 / el.as_secs_f64()
    );

    let t = Instant::now();
    AuditLog::open(&path, c.src_signer()).unwrap();
    eprintln!("AuditLog::open (resume check of {} records): {:?}", s.records, t.elapsed());

    let (sp, dp) = (c.path("s.log"), c.path("d.log"));
    let mut sl = AuditLog::open(&sp, c.src_signer()).unwrap();
    let mut dl = AuditLog::open(&dp, c.dst_signer()).unwrap();
    for i in 0..50 {
        migrate(&c.ca, &mut sl, &mut dl, &format!("m-{i}"), 4);
    }
    let t = Instant::now();
    let x = cross_check(&sp, &dp, &c.ca).unwrap();
    eprintln!(
        "cross_check: 2 x 201 records, {} migrations, in {:?}",
        x.migrations.len(),
        t.elapsed()
    );
}
