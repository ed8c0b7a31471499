//! The agent's TOML config file (config.rs AgentConfig::parse). Trusted
//! more than a peer (operator-written), but a typo or a hostile edit must
//! be refused, never crash the agent or silently weaken a setting.
#![no_main]
use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = ferry_agent::config::AgentConfig::parse(text, Path::new("fuzz.toml")) {
        assert!(cfg.migration.io_timeout_ms > 0 && cfg.migration.connect_timeout_ms > 0);
        assert!(!cfg.peers.contains_key(&cfg.host.name));
    }
});
