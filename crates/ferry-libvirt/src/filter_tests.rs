use super::*;
use crate::rpc::message;
use crate::xdr::Encoder;

const XML: &str = "<domain type='qemu'><name>web1</name>\
    <uuid>5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f</uuid><memory unit='KiB'>131072</memory>\
    <vcpu>1</vcpu><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os></domain>";
const URI: &str = "unix:///run/ferry/0193-abc/mig.sock";

fn expected() -> Expected {
    let spec = DomainFacts::parse(XML).unwrap().spec().unwrap();
    Expected { spec, migrate_uri: URI.into(), parallel_connections: None }
}

fn string(field: &str, v: &str) -> Param {
    Param { field: field.into(), value: ParamValue::String(v.into()) }
}

fn call(procedure: i32, body: &[u8]) -> Vec<u8> {
    message(REMOTE_PROGRAM, procedure, MessageType::Call, 7, body)
}

fn prepare(params: &[Param], flags: u32) -> Vec<u8> {
    let mut e = Encoder::default();
    e.params(params).opaque(b"<qemu-migration/>").u32(flags);
    call(PREPARE, &e.out)
}

fn good_prepare() -> Vec<u8> {
    prepare(&[string("destination_xml", XML), string("migrate_uri", URI)], LIVE | PEER2PEER)
}

fn finish(name: &str) -> Vec<u8> {
    let mut e = Encoder::default();
    e.params(&[string("destination_name", name), string("migrate_uri", URI)])
        .opaque(b"")
        .u32(LIVE | PEER2PEER)
        .u32(0);
    call(FINISH, &e.out)
}

fn open(uri: &str) -> Vec<u8> {
    let mut e = Encoder::default();
    e.optional_string(Some(uri)).u32(0);
    call(CONNECT_OPEN, &e.out)
}

#[test]
fn a_real_migrations_sequence_passes_and_the_prepare_xml_is_reported() {
    let mut f = ControlFilter::new(expected());
    for m in [call(66, &[]), call(60, &[0, 0, 0, 10]), open("qemu:///system"), call(360, &[])] {
        assert_eq!(f.judge(&m).unwrap().prepared_xml, None);
    }
    let ping = message(KEEPALIVE_PROGRAM, 1, MessageType::Message, 0, &[]);
    assert_eq!(f.judge(&ping).unwrap().procedure, "PING");
    let passed = f.judge(&good_prepare()).unwrap();
    assert_eq!(passed.procedure, "DOMAIN_MIGRATE_PREPARE3_PARAMS");
    assert_eq!(passed.prepared_xml.as_deref(), Some(XML));
    assert!(f.judge(&finish("web1")).is_ok());
    assert!(f.judge(&call(361, &[])).is_ok());
    assert!(f.judge(&call(2, &[])).is_ok());
}

#[test]
fn anything_outside_a_migration_is_refused_by_number() {
    let mut f = ControlFilter::new(expected());
    // DOMAIN_DEFINE_XML, DOMAIN_CREATE_XML, DOMAIN_DESTROY, and a prepare for
    // tunnelled migration (VM data inside this connection).
    for procedure in [11, 10, 12, 304, 9999] {
        let err = f.judge(&call(procedure, &[])).unwrap_err();
        assert!(
            matches!(err, Refused::Procedure { procedure: p, .. } if p == procedure),
            "{procedure}: {err}"
        );
    }
    let reply = message(REMOTE_PROGRAM, 66, MessageType::Reply, 0, &[]);
    assert!(matches!(f.judge(&reply), Err(Refused::Kind { .. })));
    let stream = message(REMOTE_PROGRAM, PREPARE, MessageType::Stream, 0, &[]);
    assert!(matches!(f.judge(&stream), Err(Refused::Kind { .. })));
}

#[test]
fn another_driver_cannot_be_opened() {
    let mut f = ControlFilter::new(expected());
    let err = f.judge(&open("lxc:///system")).unwrap_err().to_string();
    assert!(err.contains("lxc:///system"), "{err}");
}

#[test]
fn a_prepare_for_another_domain_or_size_is_refused() {
    let other = XML.replace("web1", "web2");
    let bigger = XML.replace("131072", "262144");
    let other_uuid = XML.replace("5b0c6c3e", "00000000");
    for xml in [other, bigger, other_uuid] {
        let mut f = ControlFilter::new(expected());
        let m = prepare(&[string("destination_xml", &xml), string("migrate_uri", URI)], LIVE);
        let err = f.judge(&m).unwrap_err().to_string();
        assert!(err.contains("the Offer signed web1"), "{err}");
    }
}

#[test]
fn a_prepare_elsewhere_or_with_dangerous_flags_or_parameters_is_refused() {
    let cases = [
        prepare(
            &[string("destination_xml", XML), string("migrate_uri", "tcp://0.0.0.0:4444")],
            LIVE,
        ),
        prepare(&[string("destination_xml", XML)], LIVE),
        prepare(&[string("destination_xml", XML), string("migrate_uri", URI)], LIVE | 4),
        prepare(&[string("destination_xml", XML), string("migrate_uri", URI)], LIVE | 64),
        prepare(&[string("destination_xml", XML), string("migrate_uri", URI)], LIVE | PARALLEL),
        prepare(
            &[
                string("destination_xml", XML),
                string("migrate_uri", URI),
                string("listen_address", "0.0.0.0"),
            ],
            LIVE,
        ),
        prepare(
            &[
                string("destination_xml", XML),
                string("migrate_uri", URI),
                string("destination_name", "x"),
            ],
            LIVE,
        ),
    ];
    for (i, m) in cases.iter().enumerate() {
        let mut f = ControlFilter::new(expected());
        assert!(matches!(f.judge(m), Err(Refused::Checked { .. })), "case {i}");
    }
}

#[test]
fn prepare_once_and_finish_once_after_it() {
    let mut f = ControlFilter::new(expected());
    assert!(f.judge(&finish("web1")).is_err(), "finish before prepare");
    f.judge(&good_prepare()).unwrap();
    assert!(f.judge(&good_prepare()).is_err(), "second prepare");
    assert!(f.judge(&finish("web2")).is_err(), "finish for another domain");
    f.judge(&finish("web1")).unwrap();
    assert!(f.judge(&finish("web1")).is_err(), "second finish");
}

#[test]
fn parallel_connections_must_match_the_offer() {
    let mut exp = expected();
    exp.parallel_connections = Some(2);
    let with = |n: Option<i32>| {
        let mut params = vec![string("destination_xml", XML), string("migrate_uri", URI)];
        if let Some(n) = n {
            // libvirt's name for it, as a real Prepare carries it.
            params.push(Param { field: "parallel.connections".into(), value: ParamValue::Int(n) });
        }
        prepare(&params, LIVE | PEER2PEER | PARALLEL)
    };
    assert!(ControlFilter::new(exp.clone()).judge(&with(Some(2))).is_ok());
    for other in [Some(5), Some(-1), None] {
        assert!(ControlFilter::new(exp.clone()).judge(&with(other)).is_err(), "{other:?}");
    }
    // Without multifd in the Offer no parallel connections are taken.
    assert!(ControlFilter::new(expected()).judge(&with(Some(2))).is_err());
}

#[test]
fn truncated_bodies_are_malformed_not_panics() {
    let m = good_prepare();
    for cut in [crate::rpc::HEADER_LEN, 40, m.len() - 3] {
        let mut short = m[..cut].to_vec();
        short[..4].copy_from_slice(&(cut as u32).to_be_bytes());
        let mut f = ControlFilter::new(expected());
        assert!(f.judge(&short).is_err(), "cut at {cut}");
    }
}
