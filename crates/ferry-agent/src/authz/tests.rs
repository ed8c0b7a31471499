//! Authz with the shipped example policy (docs/policy): admitted arrivals
//! count as residents.

use std::collections::BTreeMap;
use std::path::Path;

use ferry_policy::VmLabels;
use ferry_types::{HostName, VmName};

use super::Authz;
use crate::config::AgentConfig;

fn config() -> AgentConfig {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/policy");
    let text = format!(
        r#"
        [host]
        name = "host-a"
        listen = "127.0.0.1:7101"
        state_dir = "/nonexistent"
        [tls]
        cert = "h.pem"
        key = "h.key"
        ca = "ca.pem"
        [attestation]
        tcti = "swtpm:host=127.0.0.1,port=2321"
        ak = "ak.json"
        registry = "aks"
        reference_values = "refs.toml"
        [policy]
        files = ["{}"]
        entities = "{}"
        [peers]
        host-b = "127.0.0.1:7102"
        [migration]
        outgoing_max = 1
        outgoing_window_ms = 60000
        [admission]
        vm_cooldown = "60s"
        per_peer_max = 1
        per_peer_window = "60s"
        "#,
        docs.join("ferry.cedar").display(),
        docs.join("entities.json").display()
    );
    AgentConfig::parse(&text, Path::new("test.toml")).expect("config")
}

fn name<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("name")
}

fn labels(tenant: &str, excludes: &[&str]) -> VmLabels {
    VmLabels {
        tenant: tenant.into(),
        anti_affinity: excludes.iter().map(|t| (*t).to_owned()).collect(),
        ..Default::default()
    }
}

#[test]
fn an_admitted_arrival_is_a_resident_until_it_ends() {
    let authz = Authz::load(&config()).expect("authz");
    let table = BTreeMap::new();
    let (a, b): (HostName, HostName) = (name("host-a"), name("host-b"));
    let victim: VmName = name("victim");
    let arrival = authz
        .authorize_incoming(
            &b,
            &a,
            &victim,
            &labels("red", &["blue"]),
            128,
            1,
            authz.residents(&table),
            (0, 0),
            false,
            (true, true),
        )
        .expect("victim admitted");
    let residents = authz.residents(&table);
    assert_eq!(residents.len(), 1);
    assert_eq!(residents[0].name, victim);
    assert_eq!(residents[0].labels.anti_affinity, ["blue"]);

    let blue = labels("blue", &[]);
    let e = authz
        .authorize_start(&a, &name("attacker"), &blue, authz.residents(&table), true)
        .expect_err("a blue VM next to the arriving victim");
    assert!(e.message.contains("resident-anti-co-location") && e.message.contains("`victim`"));

    drop(arrival);
    assert!(authz.residents(&table).is_empty(), "an ended arrival is no resident");
    let allowed = authz
        .authorize_start(&a, &name("attacker"), &blue, authz.residents(&table), true)
        .expect("nobody here excludes blue");
    assert_eq!(allowed, ["host-start-own"]);
}
