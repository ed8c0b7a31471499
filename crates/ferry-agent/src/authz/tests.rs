//! Authz with the shipped example policy (docs/policy) and real record files:
//! limits rebuilt after a restart, and admitted arrivals counted as residents.

use std::path::Path;

use ferry_policy::VmLabels;
use ferry_types::{HostName, MigrationId, VmName};

use super::Authz;
use crate::config::AgentConfig;
use crate::records::{MigrationRecord, MigrationState, RecordStore, Role};

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

/// host-a asks to send `vm` to host-b as admin alice.
fn send(authz: &Authz, vm: &str) -> Result<Vec<String>, String> {
    let (a, b): (HostName, HostName) = (name("host-a"), name("host-b"));
    authz
        .authorize_outgoing(
            &name("alice"),
            "admin",
            &name(vm),
            &labels("blue", &[]),
            &a,
            &b,
            false,
            true,
        )
        .map_err(|e| e.to_string())
}

#[test]
fn cooldowns_and_rate_windows_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RecordStore::open(dir.path()).expect("store");
    // Before the restart: web left for host-b, and a peer offered one VM.
    let mut left = MigrationRecord::new(
        MigrationId::new(),
        Role::Source,
        name("web"),
        name("host-a"),
        name("host-b"),
    );
    left.walk_to(MigrationState::Completed);
    assert!(store.create(&mut left).expect("record"));
    let mut offered = MigrationRecord::new(
        MigrationId::new(),
        Role::Destination,
        name("db"),
        name("host-b"),
        name("host-a"),
    );
    offered.walk_to(MigrationState::Aborted);
    assert!(store.create(&mut offered).expect("record"));

    let fresh = Authz::load(&config()).expect("authz");
    assert!(send(&fresh, "web").is_ok(), "without the records nothing holds it back");

    let restarted = Authz::load(&config()).expect("authz");
    restarted.restore(&store).expect("restore");
    let e = send(&restarted, "web").expect_err("web moved a moment ago");
    assert!(e.contains("cooldown"), "{e}");
    let e = send(&restarted, "other").expect_err("host-b already had its one migration");
    assert!(e.contains("rate limit"), "{e}");
    let e = restarted
        .admission
        .try_admit(&name("host-b"), &name("x"), 1, 1, 0, 0, std::time::Instant::now())
        .expect_err("host-b already offered one");
    assert!(e.to_string().contains("peer `host-b`"), "{e}");
}

#[test]
fn an_admitted_arrival_is_a_resident_until_it_ends() {
    let authz = Authz::load(&config()).expect("authz");
    let table: Vec<crate::backend::VmDescription> = Vec::new();
    let (a, b): (HostName, HostName) = (name("host-a"), name("host-b"));
    let victim: VmName = name("victim");
    let offer = crate::evidence::OfferBody {
        migration_id: MigrationId::new(),
        source: b.clone(),
        destination: a.clone(),
        vm: victim.clone(),
        channel_binding: ferry_types::Digest32([0; 32]),
        log_head: ferry_audit::LogHead { seq: 1, hash: "00".repeat(32) },
        spec: crate::testing::lab::spec("victim"),
        labels: labels("red", &["blue"]),
        not_after_unix_ms: 0,
        streams: 1,
        postcopy: false,
    };
    let plan = crate::plan::TransferPlan::new(1, false).expect("plan");
    let arrival = authz
        .authorize_incoming(&offer, table.clone(), plan, (true, true))
        .expect("victim admitted");
    let residents = authz.residents(&table);
    assert_eq!(residents.len(), 1);
    assert_eq!(residents[0].name, victim);
    assert_eq!(residents[0].labels.anti_affinity, ["blue"]);

    let blue = labels("blue", &[]);
    let e = authz
        .authorize_start(&a, &name("attacker"), &blue, authz.residents(&table), true)
        .expect_err("a blue VM next to the arriving victim");
    assert!(
        e.to_string().contains("resident-anti-co-location") && e.to_string().contains("`victim`")
    );

    drop(arrival);
    assert!(authz.residents(&table).is_empty(), "an ended arrival is no resident");
    let allowed = authz
        .authorize_start(&a, &name("attacker"), &blue, authz.residents(&table), true)
        .expect("nobody here excludes blue");
    assert_eq!(allowed, ["host-start-own"]);
}
