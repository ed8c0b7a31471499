//! Start-up checks: everything that would otherwise surface only at the
//! first migration (a TPM nobody can reach, a certificate of another CA or
//! host, no images, a policy that does not know this host) is found when the
//! agent starts, and `ferry status` shows the same checks later.
//!
//! Each check is a pure function from what was found to a [`Check`] with a
//! fix an operator can act on; [`run`] gathers the facts. A `Fail` stops the
//! agent; a `Warn` is a state an agent may legitimately run in (a policy can
//! be fixed by SIGHUP, a peer enrolled later), logged loudly.

use std::path::{Path, PathBuf};

use ferry_identity::ChainProblem;
use ferry_types::{HostName, SpiffeId};
use serde::{Deserialize, Serialize};

use crate::config::AgentConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    /// Runs, but something will be refused until this is fixed.
    Warn,
    /// The agent does not start.
    Fail,
}

/// One start-up check and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about it; None when all is well.
    pub fix: Option<String>,
}

fn ok(name: &str, detail: String) -> Check {
    Check { name: name.into(), verdict: Verdict::Ok, detail, fix: None }
}

fn bad(name: &str, verdict: Verdict, detail: String, fix: String) -> Check {
    Check { name: name.into(), verdict, detail, fix: Some(fix) }
}

/// The agent does not start: every failed check, each with its fix.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct PreflightFailed(pub Vec<Check>);

fn render(failed: &[Check]) -> String {
    let mut s = String::from("this agent cannot start as configured:");
    for c in failed {
        s.push_str(&format!("\n  {}: {}", c.name, c.detail));
        if let Some(fix) = &c.fix {
            s.push_str(&format!("\n    fix: {fix}"));
        }
    }
    s
}

/// Log every warning; Err with every failure.
pub fn enforce(checks: &[Check]) -> Result<(), PreflightFailed> {
    for c in checks.iter().filter(|c| c.verdict == Verdict::Warn) {
        tracing::warn!(check = %c.name, fix = c.fix.as_deref().unwrap_or(""), "{}", c.detail);
    }
    let failed: Vec<Check> =
        checks.iter().filter(|c| c.verdict == Verdict::Fail).cloned().collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(PreflightFailed(failed))
    }
}

/// The certificate must load and name this host.
pub fn certificate(host: &HostName, cert: &Path, loaded: &Result<SpiffeId, String>) -> Check {
    let reissue = format!(
        "on the CA machine run `ferry ca issue host {host} --ca CA_DIR --out DIR` and install \
         DIR/{host}.pem and DIR/{host}.key as [tls] cert and key"
    );
    match loaded {
        Err(why) => {
            bad("certificate", Verdict::Fail, format!("{}: {why}", cert.display()), reissue)
        }
        Ok(SpiffeId::Host { name, .. }) if name == host => {
            ok("certificate", format!("{} names this host ({host})", cert.display()))
        }
        Ok(other) => bad(
            "certificate",
            Verdict::Fail,
            format!("{} is for {other}, but [host] name is {host}", cert.display()),
            format!("{reissue}, or set [host] name to the host the certificate names"),
        ),
    }
}

/// The certificate must chain to the configured CA; outside its validity
/// period it still starts (peers refuse it, and say so).
pub fn ca(cert: &Path, ca: &Path, problem: Option<&ChainProblem>) -> Check {
    match problem {
        None => ok("ca", format!("{} was issued by the CA in {}", cert.display(), ca.display())),
        Some(ChainProblem::NotIssuedByCa(why)) => bad(
            "ca",
            Verdict::Fail,
            format!("{} was not issued by the CA in {} ({why})", cert.display(), ca.display()),
            "[tls] ca must be the cluster CA's ca.pem, the CA that issued this host's \
             certificate: copy it from the CA machine, or reissue the certificate with that CA"
                .into(),
        ),
        Some(ChainProblem::OutsideValidity(why)) => bad(
            "ca",
            Verdict::Warn,
            format!(
                "{} is outside its validity period ({why}): peers and operators refuse it",
                cert.display()
            ),
            "issue a fresh certificate (`ferry ca issue host`) and restart the agent".into(),
        ),
    }
}

/// What was found at the TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmFacts {
    /// `insecure_disabled = true`.
    Disabled,
    /// No TPM answered; the message names the TCTI and what to pass instead.
    Unreachable(String),
    /// The TPM answered, but this host's AK file cannot be read or loaded.
    AkUnusable {
        ak: PathBuf,
        why: String,
    },
    Ready {
        tcti: String,
    },
}

pub fn tpm(facts: &TpmFacts) -> Check {
    let enrol = "enrol this host's TPM: `ferry host init` (or `ferry attest enroll`), see \
                 docs/deploy.md";
    match facts {
        TpmFacts::Disabled => bad(
            "tpm",
            Verdict::Warn,
            "INSECURE: attestation is disabled ([attestation] insecure_disabled = true); peers \
             with attestation on refuse this host"
                .into(),
            format!("{enrol}, then remove insecure_disabled"),
        ),
        TpmFacts::Unreachable(why) => bad(
            "tpm",
            Verdict::Fail,
            why.clone(),
            "start the TPM (or swtpm) or correct [attestation] tcti, then start the agent again"
                .into(),
        ),
        TpmFacts::AkUnusable { ak, why } => bad(
            "tpm",
            Verdict::Fail,
            format!("the attestation key {} is unusable: {why}", ak.display()),
            format!("{enrol}; an AK only loads in the TPM that created it"),
        ),
        TpmFacts::Ready { tcti } => ok("tpm", format!("TPM at {tcti} answers and loads the AK")),
    }
}

/// What the cluster's attestation files say about this host and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationFiles {
    /// Registry: this host's enrolled AK name, or why it cannot be read.
    pub registry: Result<Option<Vec<u8>>, String>,
    /// This host's own AK name (from its AK file), when readable.
    pub own_ak: Option<Vec<u8>>,
    /// Peers without an enrolled AK.
    pub peers_not_enrolled: Vec<HostName>,
    /// Reference values: whether this host has a class, or why they cannot be read.
    pub has_reference_values: Result<bool, String>,
}

/// Peers verify this host's quotes against these files; a gap shows at
/// the first migration, so it is named here (a warning: the other hosts'
/// copies are what counts, and they may be right).
pub fn attestation_files(host: &HostName, f: &AttestationFiles) -> Check {
    let name = "attestation_files";
    let distribute = "copy every host's aks/<host>.json and the merged reference-values.toml to \
                      every host (docs/deploy.md, \"Share the attestation files\")";
    let registry = match &f.registry {
        Err(why) => return bad(name, Verdict::Fail, why.clone(), distribute.into()),
        Ok(r) => r,
    };
    let refs = match &f.has_reference_values {
        Err(why) => return bad(name, Verdict::Fail, why.clone(), distribute.into()),
        Ok(r) => *r,
    };
    let mut gaps = Vec::new();
    match (registry, &f.own_ak) {
        (None, _) => gaps.push(format!("the AK registry has no entry for {host}")),
        (Some(enrolled), Some(own)) if enrolled != own => gaps.push(format!(
            "the AK registry's entry for {host} is not this host's AK (enrolled again since?)"
        )),
        _ => {}
    }
    if !refs {
        gaps.push(format!("the reference values have no class for {host}"));
    }
    if !f.peers_not_enrolled.is_empty() {
        let peers: Vec<&str> = f.peers_not_enrolled.iter().map(HostName::as_str).collect();
        gaps.push(format!("no AK is enrolled for peer(s) {}", peers.join(", ")));
    }
    if gaps.is_empty() {
        ok(name, "this host and its peers are enrolled, with reference values".into())
    } else {
        bad(
            name,
            Verdict::Warn,
            format!("{}: migrations with those hosts are refused", gaps.join("; ")),
            distribute.into(),
        )
    }
}

/// What was found at the images directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirFacts {
    Missing,
    Unreadable(String),
    Entries(usize),
}

pub fn images(dir: &Path, facts: &DirFacts) -> Check {
    let fix = format!(
        "create {d} (`mkdir -p {d}`) and put the VM images there, the same files on every host \
         (docs/deploy.md, \"Images\")",
        d = dir.display()
    );
    match facts {
        DirFacts::Missing => {
            bad("images", Verdict::Fail, format!("{} does not exist", dir.display()), fix)
        }
        DirFacts::Unreadable(why) => {
            bad("images", Verdict::Fail, format!("cannot read {}: {why}", dir.display()), fix)
        }
        DirFacts::Entries(0) => bad(
            "images",
            Verdict::Warn,
            format!("{} is empty: no VM can start on or move to this host", dir.display()),
            fix,
        ),
        DirFacts::Entries(n) => ok("images", format!("{} holds {n} file(s)", dir.display())),
    }
}

/// Hosts the policy does not know are denied every migration.
pub fn policy_entities(
    host: &HostName,
    peers: &[HostName],
    entities: &Path,
    known: &Result<Vec<String>, String>,
) -> Check {
    let name = "policy_entities";
    let known = match known {
        Ok(k) => k,
        Err(why) => return bad(name, Verdict::Fail, why.clone(), "fix the entities file".into()),
    };
    let missing: Vec<&str> = std::iter::once(host)
        .chain(peers)
        .map(HostName::as_str)
        .filter(|h| !known.iter().any(|k| k == h))
        .collect();
    if missing.is_empty() {
        return ok(name, format!("{} names this host and its peers", entities.display()));
    }
    let example = format!(
        "{{\"uid\": {{\"type\": \"Host\", \"id\": \"{}\"}}, \"attrs\": {{\"zone\": \"zone-1\", \
         \"trust_level\": 3}}, \"parents\": []}}",
        missing[0]
    );
    bad(
        name,
        Verdict::Warn,
        format!(
            "{} has no Host entity for {}: policy denies every migration from or to it",
            entities.display(),
            missing.join(", ")
        ),
        format!("add e.g. {example} to it and reload the policy (SIGHUP or `ferry policy reload`)"),
    )
}

/// Gather the facts and run every check. Reads files and talks to the TPM
/// (on a blocking thread); never fails itself.
pub async fn run(cfg: &AgentConfig) -> Vec<Check> {
    let host = &cfg.host.name;
    let (loaded, chain) =
        match ferry_identity::Identity::load(&cfg.tls.cert, &cfg.tls.key, &cfg.tls.ca, None) {
            Ok(id) => (Ok(id.spiffe().clone()), Some(id.chain_problem())),
            Err(e) => (Err(crate::report::report(&e)), None),
        };
    let mut checks = vec![certificate(host, &cfg.tls.cert, &loaded)];
    if let Some(problem) = chain {
        checks.push(ca(&cfg.tls.cert, &cfg.tls.ca, problem.as_ref()));
    }
    let attestation = cfg.attestation.paths(Path::new("config")).ok().flatten();
    let tcti_facts = match &attestation {
        None => TpmFacts::Disabled,
        Some(p) => {
            let p = p.clone();
            tokio::task::spawn_blocking(move || probe_tpm(&p.tcti, &p.ak))
                .await
                .unwrap_or_else(|e| TpmFacts::Unreachable(format!("TPM probe failed: {e}")))
        }
    };
    checks.push(tpm(&tcti_facts));
    if let Some(p) = &attestation {
        checks.push(attestation_files(host, &read_attestation_files(cfg, p)));
    }
    checks.push(images(&cfg.qemu.images_dir, &read_dir(&cfg.qemu.images_dir)));
    let known =
        ferry_policy::entity_hosts(&cfg.policy.entities).map_err(|e| crate::report::report(&e));
    let peers: Vec<HostName> = cfg.peers.keys().cloned().collect();
    checks.push(policy_entities(host, &peers, &cfg.policy.entities, &known));
    checks
}

fn probe_tpm(tcti: &str, ak: &Path) -> TpmFacts {
    if let Err(e) = ferry_attest::read_pcrs(tcti, &[0]) {
        return TpmFacts::Unreachable(crate::report::report(&e));
    }
    let loaded = ferry_attest::AkBlob::load(ak)
        .and_then(|blob| ferry_attest::Attester::open(tcti, &blob).map(drop));
    match loaded {
        Ok(()) => TpmFacts::Ready { tcti: tcti.to_owned() },
        Err(e) => TpmFacts::AkUnusable { ak: ak.to_owned(), why: crate::report::report(&e) },
    }
}

fn read_attestation_files(
    cfg: &AgentConfig,
    p: &crate::config::AttestationPaths,
) -> AttestationFiles {
    let host = &cfg.host.name;
    let registry =
        ferry_attest::AkRegistry::load(&p.registry).map_err(|e| crate::report::report(&e));
    let peers_not_enrolled = match &registry {
        Ok(r) => cfg.peers.keys().filter(|h| r.get(h).is_none()).cloned().collect(),
        Err(_) => Vec::new(),
    };
    AttestationFiles {
        registry: registry.map(|r| r.get(host).map(|a| a.ak_name.clone())),
        own_ak: ferry_attest::AkBlob::load(&p.ak).ok().map(|b| b.name()),
        peers_not_enrolled,
        has_reference_values: ferry_attest::ReferenceValues::load(&p.reference_values)
            .map(|r| r.expected(host).is_some())
            .map_err(|e| crate::report::report(&e)),
    }
}

fn read_dir(dir: &Path) -> DirFacts {
    match std::fs::read_dir(dir) {
        Ok(entries) => DirFacts::Entries(entries.count()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DirFacts::Missing,
        Err(e) => DirFacts::Unreadable(e.to_string()),
    }
}

#[cfg(test)]
#[path = "preflight_tests.rs"]
mod tests;
