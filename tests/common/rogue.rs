//! A rogue source: a real host's certificate, TPM and key, sending what a test wants.
#![allow(unused_imports)]
use super::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------
// A rogue source (tests/attacks.rs, tests/replay.rs): the test itself plays
// a lab host, with that host's real certificate, key, TPM and AK, and speaks
// the peer protocol by hand, so it can send what a real agent never would.

/// A frame as the wire carries it: kind, three reserved bytes, u32 length.
pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![kind, 0, 0, 0];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A control frame holding `v` as JSON.
pub fn control(v: &Value) -> Vec<u8> {
    frame(1, v.to_string().as_bytes())
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis()
        as u64
}

/// A connection to `to_host`'s agent as `as_host` (blocking API; it owns a
/// small tokio runtime). The migration id starts fresh and may be replaced
/// with [`RogueSource::set_migration_id`] before [`RogueSource::attest`].
pub struct RogueSource {
    pub as_host: String,
    pub to_host: String,
    /// TLS exporter of this connection (label `EXPORTER-ferry-attestation`).
    pub exporter: [u8; 32],
    pub id: ferry_types::MigrationId,
    /// The destination's answer to our Attest, once [`RogueSource::attest`] ran.
    pub peer_attest: Option<Value>,
    tcti: String,
    ak: PathBuf,
    selection: Vec<u8>,
    signer: ferry_audit::Signer,
    reader: ferry_agent::net::Reader,
    writer: ferry_agent::net::Writer,
    // Declared last: dropped after the connection it drives.
    rt: tokio::runtime::Runtime,
}

impl RogueSource {
    /// mTLS (as `as_host`, checking that the peer is `to_host`) and the
    /// protocol greeting. Err carries the error chain (e.g. a refused handshake).
    pub fn connect(lab: &TestLab, as_host: &str, to_host: &str) -> Result<RogueSource, String> {
        let me = lab.host(as_host);
        let peer = lab.host(to_host);
        let tpm = me.tpm.as_ref().ok_or_else(|| format!("{as_host} has no TPM in this lab"))?;
        let refs_path =
            lab.lab.reference_values.as_ref().ok_or("the lab has no reference values")?;
        let refs =
            ferry_attest::ReferenceValues::load(refs_path).map_err(|e| ferry_agent::report(&e))?;
        let selection = refs
            .selection_for(&me.name)
            .unwrap_or_else(|| ferry_attest::DEFAULT_PCR_SELECTION.to_vec());
        let signer =
            ferry_audit::Signer::load(&me.cert, &me.key).map_err(|e| ferry_agent::report(&e))?;
        let identity =
            ferry_identity::Identity::load(&me.cert, &me.key, &lab.lab.ca, Some(&lab.lab.crl))
                .map_err(|e| ferry_agent::report(&e))?;
        let domain = identity.domain().clone();
        let cfg = ferry_identity::client_config(&identity).map_err(|e| ferry_agent::report(&e))?;
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (addr, name) = (peer.addr, peer.name.clone());
        let (exporter, reader, writer) = rt.block_on(async move {
            let timeout = Duration::from_secs(10);
            let (stream, peer) =
                ferry_agent::net::connect(addr, None, None, &name, cfg, &domain, timeout)
                    .await
                    .map_err(|e| ferry_agent::report(&e))?;
            let exporter = *peer.binding().as_bytes();
            let (mut reader, writer) = ferry_agent::net::greet(stream, &name, addr, timeout)
                .await
                .map_err(|e| ferry_agent::report(&e))?;
            reader.set_timeout(Duration::from_secs(60));
            Ok::<_, String>((exporter, reader, writer))
        })?;
        Ok(RogueSource {
            as_host: as_host.to_owned(),
            to_host: to_host.to_owned(),
            exporter,
            id: ferry_types::MigrationId::new(),
            peer_attest: None,
            tcti: tpm.tcti.clone(),
            ak: tpm.ak.clone(),
            selection,
            signer,
            reader,
            writer,
            rt,
        })
    }

    pub fn set_migration_id(&mut self, id: ferry_types::MigrationId) {
        self.id = id;
    }

    pub fn set_read_timeout(&mut self, t: Duration) {
        self.reader.set_timeout(t);
    }

    /// `offer_binding(exporter, id)` of this connection for the current id.
    pub fn binding(&self) -> ferry_types::Digest32 {
        ferry_agent::protocol::offer_binding(&self.exporter, &self.id)
    }

    /// A real quote by `as_host`'s TPM and AK, bound to this connection,
    /// the current migration id and `role`.
    pub fn quote(&self, role: ferry_attest::QuoteRole) -> Result<ferry_attest::Evidence, String> {
        let qd = ferry_attest::qualifying_data(&self.exporter, &self.id, role);
        let ak = ferry_attest::AkBlob::load(&self.ak).map_err(|e| ferry_agent::report(&e))?;
        let mut attester =
            ferry_attest::Attester::open(&self.tcti, &ak).map_err(|e| ferry_agent::report(&e))?;
        attester.quote(&self.selection, &qd).map_err(|e| ferry_agent::report(&e))
    }

    /// Step 3 (docs/protocol.md) as a source: send a real quote, read the destination's answer.
    /// Ok(its Attest message); Err if it answered anything else or closed.
    pub fn attest(&mut self) -> Result<Value, String> {
        let evidence = self.quote(ferry_attest::QuoteRole::Source)?;
        let msg = ferry_agent::protocol::PeerMessage::Attest {
            migration_id: self.id,
            evidence: Some(evidence),
            vtpm: None,
        };
        self.send(&serde_json::to_value(&msg).expect("attest json"))?;
        let answer = self.read()?;
        if answer["type"] != "attest" || answer["migration_id"] != json_str(&self.id) {
            return Err(format!("the destination answered our quote with {answer}"));
        }
        self.peer_attest = Some(answer.clone());
        Ok(answer)
    }

    /// A valid Offer body (as `evidence::OfferBody`) for VM `vm` from this
    /// connection's host to its peer: current id, this connection's binding.
    pub fn offer_body(&self, vm: &str) -> Value {
        let body = serde_json::json!({
            "migration_id": json_str(&self.id),
            "source": self.as_host,
            "destination": self.to_host,
            "vm": vm,
            "channel_binding": self.binding(),
            "log_head": {"seq": 0, "hash": "0".repeat(64)},
            "spec": {"name": vm, "memory_mib": 256, "vcpus": 1, "machine": "q35",
                     "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": "fill_mib=8 hb_ms=10"}},
            "labels": {"tenant": "default", "security_level": 0, "allowed_zones": [], "anti_affinity": []},
            "not_after_unix_ms": unix_ms() + 60_000,
        });
        let typed: ferry_agent::evidence::OfferBody =
            serde_json::from_value(body.clone()).expect("offer_body is an OfferBody");
        drop(typed);
        body
    }

    /// A Commit/Receipt body (`evidence::StreamBody`) with the address of `offer`.
    pub fn stream_body(&self, offer: &Value, bytes: u64, digest: ferry_types::Digest32) -> Value {
        serde_json::json!({
            "migration_id": offer["migration_id"], "source": offer["source"], "destination": offer["destination"],
            "vm": offer["vm"], "channel_binding": offer["channel_binding"],
            "log_head": {"seq": 0, "hash": "0".repeat(64)}, "bytes": bytes, "digest": digest,
        })
    }

    /// Sign `body` as `kind` with `as_host`'s key (bound to its certificate).
    pub fn sign(&self, kind: &str, body: &impl serde::Serialize) -> ferry_audit::Signed {
        ferry_audit::Signed::sign(kind, body, &self.signer).expect("sign")
    }

    /// Send `PeerMessage::Offer { signed }` over `body`, signed by this host.
    pub fn send_offer(&mut self, body: Value) -> Result<ferry_audit::Signed, String> {
        self.send_signed("offer", &body)
    }

    /// Sign `body` as `kind` and send it as the message of that kind
    /// (`offer`, `accept`, `commit`, `receipt`; `abort` with a reason).
    pub fn send_signed(
        &mut self,
        kind: &str,
        body: &impl serde::Serialize,
    ) -> Result<ferry_audit::Signed, String> {
        let signed = self.sign(kind, body);
        self.send_signed_message(kind, &signed)?;
        Ok(signed)
    }

    /// Send an already signed message (e.g. a recorded one) as `kind`.
    pub fn send_signed_message(
        &mut self,
        kind: &str,
        signed: &ferry_audit::Signed,
    ) -> Result<(), String> {
        let signed_json = serde_json::to_value(signed).expect("signed json");
        let msg = if kind == "abort" {
            serde_json::json!({"type": "abort", "migration_id": json_str(&self.id), "reason": "rogue abort", "signed": signed_json})
        } else {
            serde_json::json!({"type": kind, "signed": signed_json})
        };
        self.send(&msg)
    }

    /// Send one control message (any JSON: the agent decides if it is one).
    pub fn send(&mut self, msg: &Value) -> Result<(), String> {
        let w = &mut self.writer;
        self.rt.block_on(w.write_control(msg)).map_err(|e| ferry_agent::report(&e))
    }

    /// Write raw bytes (frames or not) and flush.
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let w = self.writer.get_mut();
        self.rt
            .block_on(async {
                w.write_all(bytes).await?;
                w.flush().await
            })
            .map_err(|e| e.to_string())
    }

    /// Close our sending side (TLS close_notify).
    pub fn close_write(&mut self) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let w = self.writer.get_mut();
        self.rt.block_on(w.shutdown()).map_err(|e| e.to_string())
    }

    /// Read one control message as JSON.
    pub fn read(&mut self) -> Result<Value, String> {
        let r = &mut self.reader;
        self.rt.block_on(r.read_control::<Value>()).map_err(|e| ferry_agent::report(&e))
    }

    /// Read until the agent closes the connection (or the read times out):
    /// (every message received, the error that ended the reading).
    pub fn read_until_closed(&mut self) -> (Vec<Value>, String) {
        let mut got = Vec::new();
        loop {
            match self.read() {
                Ok(v) => got.push(v),
                Err(e) => return (got, e),
            }
        }
    }
}

fn json_str<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("json")
}

/// Append `section` (e.g. "[audit]\nlog = \"...\"") to a host's agent.toml.
pub fn append_config(lab: &TestLab, host: &str, section: &str) {
    let cfg = &lab.host(host).config;
    let mut s = std::fs::read_to_string(cfg).expect("cfg");
    let header = section.lines().next().unwrap_or("");
    assert!(!s.contains(header), "{} already has {header}", cfg.display());
    s.push('\n');
    s.push_str(section);
    s.push('\n');
    std::fs::write(cfg, s).expect("cfg");
}
