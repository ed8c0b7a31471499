//! The machine's own ceilings for Ferry's data path: how fast one core of this
//! machine runs the primitives every VM byte goes through (the TLS 1.3 AEADs
//! in aws-lc-rs, the library behind Ferry's rustls provider; BLAKE3; memcpy)
//! and how fast loopback TCP carries bytes. Benchmarks print these first, so a
//! reader can tell a slow machine from a slow Ferry.
//!
//! Primitive rates are bytes per second of the measuring thread's own CPU
//! time, not of wall time: on a shared machine another process taking the
//! core does not make AES look slower. They are the per-GB costs a relay's
//! floor is built from ([`Ceilings::floor_parts`]).

mod cpu;
mod tcp;

use std::fmt;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};

pub use cpu::thread_cpu_seconds;

/// A TLS record's worth of plaintext: the unit the AEAD works on.
pub const RECORD: usize = 16 * 1024;
/// The working set the primitives cycle over: a relay's buffer, cache-warm.
const WORKING_SET: usize = 1024 * 1024;
/// A large BLAKE3 update: one socket read's worth.
pub const LARGE_UPDATE: usize = 256 * 1024;

/// The TLS 1.3 AEADs Ferry's rustls provider offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Suite {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

impl Suite {
    pub const ALL: [Suite; 3] = [Suite::Aes128Gcm, Suite::Aes256Gcm, Suite::Chacha20Poly1305];

    /// The IANA name of the TLS 1.3 cipher suite using this AEAD.
    pub fn tls_name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "TLS_AES_128_GCM_SHA256",
            Suite::Aes256Gcm => "TLS_AES_256_GCM_SHA384",
            Suite::Chacha20Poly1305 => "TLS_CHACHA20_POLY1305_SHA256",
        }
    }

    pub fn short_name(self) -> &'static str {
        match self {
            Suite::Aes128Gcm => "AES-128-GCM",
            Suite::Aes256Gcm => "AES-256-GCM",
            Suite::Chacha20Poly1305 => "ChaCha20-Poly1305",
        }
    }

    fn algorithm(self) -> &'static aead::Algorithm {
        match self {
            Suite::Aes128Gcm => &aead::AES_128_GCM,
            Suite::Aes256Gcm => &aead::AES_256_GCM,
            Suite::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CeilingError {
    #[error("aws-lc-rs refused a {0} key or operation")]
    Aead(&'static str),
    #[error("loopback TCP: {doing}")]
    Tcp {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// One AEAD's rates, in bytes of plaintext per CPU second.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct AeadRate {
    pub suite: Suite,
    pub seal: f64,
    pub open: f64,
}

/// Everything [`measure`] found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ceilings {
    pub aead: Vec<AeadRate>,
    /// BLAKE3 updated one record at a time (as the sending relay hashes).
    pub blake3: f64,
    /// BLAKE3 updated with [`LARGE_UPDATE`] bytes at a time (as the
    /// receiving relay hashes what one socket read brought).
    pub blake3_large: f64,
    /// memcpy of record-sized pieces within a cache-warm megabyte.
    pub memcpy: f64,
    /// Loopback TCP, one sender and one receiver thread, bytes per wall second.
    pub tcp_loopback: f64,
}

/// The per-GB CPU cost of the cryptography one relayed stream pays: seal on
/// the source, open on the destination, BLAKE3 on both (record by record on
/// the source, a socket read at a time on the destination).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FloorParts {
    pub seal_s_per_gb: f64,
    pub open_s_per_gb: f64,
    pub blake3_send_s_per_gb: f64,
    pub blake3_receive_s_per_gb: f64,
}

impl FloorParts {
    /// Seal + open + BLAKE3 on both sides, CPU seconds per GB (10^9 bytes).
    pub fn total(&self) -> f64 {
        self.seal_s_per_gb
            + self.open_s_per_gb
            + self.blake3_send_s_per_gb
            + self.blake3_receive_s_per_gb
    }
}

fn s_per_gb(bytes_per_s: f64) -> f64 {
    1e9 / bytes_per_s
}

impl Ceilings {
    pub fn aead(&self, suite: Suite) -> Option<AeadRate> {
        self.aead.iter().copied().find(|r| r.suite == suite)
    }

    /// The cryptographic part of a stream's floor with `suite`, if measured.
    pub fn floor_parts(&self, suite: Suite) -> Option<FloorParts> {
        let r = self.aead(suite)?;
        Some(FloorParts {
            seal_s_per_gb: s_per_gb(r.seal),
            open_s_per_gb: s_per_gb(r.open),
            blake3_send_s_per_gb: s_per_gb(self.blake3),
            blake3_receive_s_per_gb: s_per_gb(self.blake3_large),
        })
    }
}

impl fmt::Display for Ceilings {
    /// One line per figure, in GB/s (10^9 bytes), for the top of a report.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = |r: f64| r / 1e9;
        for r in &self.aead {
            writeln!(
                f,
                "{:<18} seal {:5.2} GB/s  open {:5.2} GB/s  (aws-lc-rs, one core, {} B records)",
                r.suite.short_name(),
                gb(r.seal),
                gb(r.open),
                RECORD
            )?;
        }
        writeln!(
            f,
            "{:<18} {:5.2} GB/s  (one core, {} B updates)",
            "BLAKE3",
            gb(self.blake3),
            RECORD
        )?;
        writeln!(f, "{:<18} {:5.2} GB/s  (one core, cache-warm)", "memcpy", gb(self.memcpy))?;
        write!(
            f,
            "{:<18} {:5.2} GB/s  (one stream, wall clock)",
            "loopback TCP",
            gb(self.tcp_loopback)
        )
    }
}

/// How much each figure processes: more is steadier, less is quicker.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Bytes per primitive per trial.
    pub bytes: usize,
    /// Trials per primitive; the median is kept.
    pub trials: usize,
    /// Bytes sent over loopback TCP (once).
    pub tcp_bytes: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { bytes: 256 << 20, trials: 3, tcp_bytes: 1 << 30 }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Bytes per CPU second of `work(bytes)`, median over the budget's trials.
fn rate(
    budget: Budget,
    mut work: impl FnMut(usize) -> Result<(), CeilingError>,
) -> Result<f64, CeilingError> {
    let mut rates = Vec::with_capacity(budget.trials);
    work(WORKING_SET)?; // warm the caches and the code
    for _ in 0..budget.trials.max(1) {
        let t0 = thread_cpu_seconds();
        work(budget.bytes)?;
        let dt = (thread_cpu_seconds() - t0).max(1e-9);
        rates.push(budget.bytes as f64 / dt);
    }
    Ok(median(rates))
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    blake3::Hasher::new().update(b"ferry ceilings").finalize_xof().fill(&mut v);
    v
}

/// Seal, and seal then open, `bytes` in records cycling over a warm buffer.
fn aead_rate(suite: Suite, budget: Budget) -> Result<AeadRate, CeilingError> {
    let alg = suite.algorithm();
    let key_bytes = pseudo_random(alg.key_len());
    let key = LessSafeKey::new(
        UnboundKey::new(alg, &key_bytes).map_err(|_| CeilingError::Aead(suite.short_name()))?,
    );
    let mut buf = pseudo_random(WORKING_SET);
    let aad_bytes = [23u8, 3, 3, 0x40, 0x11];
    let mut seq = 0u64;
    let nonce = |seq: u64| {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let err = || CeilingError::Aead(suite.short_name());
    let seal = rate(budget, |bytes| {
        for i in 0..bytes / RECORD {
            let rec = &mut buf[(i * RECORD) % WORKING_SET..][..RECORD];
            seq += 1;
            let tag = key
                .seal_in_place_separate_tag(nonce(seq), Aad::from(aad_bytes), rec)
                .map_err(|_| err())?;
            let _ = std::hint::black_box(tag);
        }
        Ok(())
    })?;
    // Open the way the receiving relay does: out of place, one pass from a
    // sealed record into a plaintext buffer, the ciphertext left as it was.
    let records = WORKING_SET / RECORD;
    let mut tags = Vec::with_capacity(records);
    let first = seq + 1;
    for i in 0..records {
        seq += 1;
        let rec = &mut buf[i * RECORD..][..RECORD];
        let tag = key
            .seal_in_place_separate_tag(nonce(seq), Aad::from(aad_bytes), rec)
            .map_err(|_| err())?;
        tags.push(tag);
    }
    let mut out = vec![0u8; RECORD];
    let open = rate(budget, |bytes| {
        for i in 0..bytes / RECORD {
            let r = i % records;
            key.open_separate_gather(
                nonce(first + r as u64),
                Aad::from(aad_bytes),
                &buf[r * RECORD..][..RECORD],
                tags[r].as_ref(),
                &mut out,
            )
            .map_err(|_| err())?;
        }
        std::hint::black_box(&mut out);
        Ok(())
    })?;
    Ok(AeadRate { suite, seal, open })
}

fn blake3_rate(budget: Budget, update: usize) -> Result<f64, CeilingError> {
    let buf = pseudo_random(WORKING_SET);
    rate(budget, |bytes| {
        let mut h = blake3::Hasher::new();
        for i in 0..bytes / update {
            h.update(&buf[(i * update) % WORKING_SET..][..update]);
        }
        std::hint::black_box(h.finalize());
        Ok(())
    })
}

fn memcpy_rate(budget: Budget) -> Result<f64, CeilingError> {
    let src = pseudo_random(WORKING_SET);
    let mut dst = vec![0u8; WORKING_SET];
    rate(budget, |bytes| {
        for i in 0..bytes / RECORD {
            let at = (i * RECORD) % WORKING_SET;
            dst[at..at + RECORD].copy_from_slice(&src[at..at + RECORD]);
            std::hint::black_box(&mut dst);
        }
        Ok(())
    })
}

/// Only the primitives (no TCP): quick enough to interleave with other runs.
pub fn measure_primitives(budget: Budget) -> Result<Ceilings, CeilingError> {
    let aead = Suite::ALL.iter().map(|s| aead_rate(*s, budget)).collect::<Result<_, _>>()?;
    Ok(Ceilings {
        aead,
        blake3: blake3_rate(budget, RECORD)?,
        blake3_large: blake3_rate(budget, LARGE_UPDATE)?,
        memcpy: memcpy_rate(budget)?,
        tcp_loopback: f64::NAN,
    })
}

/// Every ceiling, loopback TCP included.
pub fn measure(budget: Budget) -> Result<Ceilings, CeilingError> {
    let mut c = measure_primitives(budget)?;
    c.tcp_loopback = tcp::loopback_rate(budget.tcp_bytes)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SMALL: Budget = Budget { bytes: 4 << 20, trials: 1, tcp_bytes: 8 << 20 };

    #[test]
    fn every_figure_is_a_positive_finite_rate() {
        let c = measure(SMALL).unwrap();
        assert_eq!(c.aead.len(), 3);
        for r in &c.aead {
            assert!(r.seal.is_finite() && r.seal > 1e6, "{r:?}");
            assert!(r.open.is_finite() && r.open > 1e6, "{r:?}");
        }
        for v in [c.blake3, c.blake3_large, c.memcpy, c.tcp_loopback] {
            assert!(v.is_finite() && v > 1e6, "{c:?}");
        }
        let text = c.to_string();
        for want in ["AES-128-GCM", "AES-256-GCM", "ChaCha20-Poly1305", "BLAKE3", "memcpy", "TCP"] {
            assert!(text.contains(want), "{text}");
        }
    }

    #[test]
    fn the_floor_counts_seal_open_and_blake3_on_both_sides() {
        let c = Ceilings {
            aead: vec![AeadRate { suite: Suite::Aes128Gcm, seal: 4e9, open: 5e9 }],
            blake3: 8e9,
            blake3_large: 10e9,
            memcpy: 20e9,
            tcp_loopback: 3e9,
        };
        let p = c.floor_parts(Suite::Aes128Gcm).unwrap();
        assert!((p.seal_s_per_gb - 0.25).abs() < 1e-12);
        assert!((p.open_s_per_gb - 0.2).abs() < 1e-12);
        assert!((p.total() - (0.25 + 0.2 + 0.125 + 0.1)).abs() < 1e-12);
        assert!(c.floor_parts(Suite::Aes256Gcm).is_none());
    }
}
