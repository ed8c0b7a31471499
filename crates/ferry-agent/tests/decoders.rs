//! Every decoder of untrusted input the agent owns, run over the committed
//! fuzz seeds and thousands of deterministic mutations of them: none may
//! panic. (cargo-fuzz explores further with scripts/fuzz.sh; this keeps the
//! default suite exercising the same entry points.)

use std::path::{Path, PathBuf};

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| std::fs::read(e.path()).expect("seed"))
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.sort();
    out
}

/// Bit flips, byte deletions, duplications and truncations of each seed.
fn mutations(seed: &[u8], rounds: usize) -> Vec<Vec<u8>> {
    let mut x: u32 = 0x9e37_79b9 ^ seed.len() as u32;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as usize
    };
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut m = seed.to_vec();
        for _ in 0..1 + next() % 4 {
            if m.is_empty() {
                m.push(next() as u8);
                continue;
            }
            let i = next() % m.len();
            match next() % 5 {
                0 => m[i] ^= 1 << (next() % 8),
                1 => {
                    m.remove(i);
                }
                2 => m.insert(i, m[i]),
                3 => m.truncate(i),
                _ => m[i] = b"{}[]\":,0aZ\\"[next() % 11],
            }
        }
        out.push(m);
    }
    out
}

fn run(target: &str, decode: impl Fn(&[u8])) {
    let mut n = 0;
    for seed in seeds(target) {
        decode(&seed);
        for m in mutations(&seed, 2_000) {
            decode(&m);
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn peer_messages_never_panic() {
    run("peer_message", |b| {
        let _ = serde_json::from_slice::<ferry_agent::protocol::PeerMessage>(b);
        let _ = serde_json::from_slice::<ferry_agent::protocol::Hello>(b);
    });
}

#[test]
fn api_requests_never_panic() {
    run("api_request", |b| {
        let _ = serde_json::from_slice::<ferry_agent::protocol::ApiRequest>(b);
    });
}

#[test]
fn agent_configs_never_panic() {
    run("agent_config", |b| {
        if let Ok(text) = std::str::from_utf8(b) {
            let _ = ferry_agent::AgentConfig::parse(text, &PathBuf::from("fuzz.toml"));
        }
    });
}

#[test]
fn vm_specs_never_panic() {
    run("vm_spec", |b| {
        let _ = serde_json::from_slice::<ferry_vmm::VmSpec>(b);
    });
}

#[test]
fn attestation_evidence_never_panics() {
    run("evidence", |b| {
        let _ = ferry_attest::Evidence::from_json(b);
    });
}

#[test]
fn reference_values_never_panic() {
    run("reference_values", |b| {
        if let Ok(text) = std::str::from_utf8(b) {
            let _ = ferry_attest::ReferenceValues::from_toml(text);
        }
    });
}
