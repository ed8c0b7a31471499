//! Shared fixtures: a real cluster CA and host certificates made with
//! ferry_identity::CaDir, and a simulated migration that both hosts log.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use ferry_audit::{AuditEvent, AuditLog, CaTrust, LogHead, Signed, Signer};
use ferry_identity::{CaDir, IssuedCert, Validity};
use serde::{Deserialize, Serialize};

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub ca_dir: CaDir,
    pub ca: CaTrust,
    pub src: IssuedCert,
    pub dst: IssuedCert,
}

pub fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = CaDir::init(&dir.path().join("ca"), &"ferry.test".parse().unwrap(), 365).unwrap();
    let ca = CaTrust::load(&ca_dir.cert_path()).unwrap();
    let certs = dir.path().join("certs");
    let src = ca_dir.issue_host(&"src-host".parse().unwrap(), Validity::days(30), &certs).unwrap();
    let dst = ca_dir.issue_host(&"dst-host".parse().unwrap(), Validity::days(30), &certs).unwrap();
    Cluster { dir, ca_dir, ca, src, dst }
}

impl Cluster {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    pub fn src_signer(&self) -> Signer {
        Signer::load(&self.src.cert, &self.src.key).unwrap()
    }
    pub fn dst_signer(&self) -> Signer {
        Signer::load(&self.dst.cert, &self.dst.key).unwrap()
    }
}

/// The shape the agent's message bodies will have (enough for the tests).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Body {
    pub migration_id: String,
    pub source: String,
    pub destination: String,
    pub vm: String,
    pub channel_binding: String,
    pub digests: Vec<String>,
    pub log_head: LogHead,
}

fn event(kind: &str, mid: &str, peer: &str, signed: Signed) -> AuditEvent {
    AuditEvent {
        kind: kind.into(),
        migration_id: Some(mid.into()),
        vm: Some("vm-1".into()),
        peer: Some(peer.into()),
        detail: serde_json::json!({}),
        signed: Some(signed),
    }
}

/// One migration as both agents would record it: each side logs what it
/// signs before sending and what it receives after verifying it.
/// `until`: how many of offer, accept, commit, receipt happen.
pub fn migrate(ca: &CaTrust, s: &mut AuditLog, d: &mut AuditLog, mid: &str, until: usize) {
    let steps = [("offer", true), ("accept", false), ("commit", true), ("receipt", false)];
    exchange(ca, s, d, mid, &steps[..until]);
}

/// Messages of one migration in the given order: (kind, sent by the source).
pub fn exchange(
    ca: &CaTrust,
    s: &mut AuditLog,
    d: &mut AuditLog,
    mid: &str,
    steps: &[(&str, bool)],
) {
    let (sh, dh) = (s.host().to_owned(), d.host().to_owned());
    let body = |log: &AuditLog, digests: Vec<String>| Body {
        migration_id: mid.into(),
        source: sh.clone(),
        destination: dh.clone(),
        vm: "vm-1".into(),
        channel_binding: "ab".repeat(32),
        digests,
        log_head: log.head(),
    };
    for &(kind, from_source) in steps {
        let (me, peer) = if from_source { (&mut *s, &mut *d) } else { (&mut *d, &mut *s) };
        let digests = if kind == "commit" || kind == "switchover" {
            vec!["00".repeat(32), "11".repeat(32)]
        } else {
            vec![]
        };
        let msg = Signed::sign(kind, &body(me, digests), me.signer()).unwrap();
        let peer_host = peer.host().to_owned();
        me.append(&event(&format!("{kind}_sent"), mid, &peer_host, msg.clone())).unwrap();
        let (_b, who): (Body, ferry_types::SpiffeId) = msg.verify(kind, ca).unwrap();
        assert_eq!(who.to_string(), me.host());
        let my_host = me.host().to_owned();
        peer.append(&event(&format!("{kind}_received"), mid, &my_host, msg)).unwrap();
    }
}

pub fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}
