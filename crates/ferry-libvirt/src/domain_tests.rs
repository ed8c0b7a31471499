use super::*;

const XML: &str = r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>web1</name>
  <uuid>5B0C6C3E-4f39-4a7e-9a52-6b8f7c1d2e3f</uuid>
  <metadata>
    <ferry:labels xmlns:ferry="https://ferry.dev/xmlns/labels/1" tenant="acme"
                  security-level="2" zones="eu-1 eu-2" anti-affinity="rival"/>
  </metadata>
  <memory unit='KiB'>131072</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <serial type='file'><source path='/var/log/web1.console'/><target port='0'/></serial>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
  </devices>
</domain>"#;

#[test]
fn identity_size_tpm_labels_and_console_come_from_the_xml() {
    let d = DomainFacts::parse(XML).unwrap();
    assert_eq!((d.name.as_str(), d.memory_kib, d.vcpus), ("web1", 131072, 2));
    assert_eq!(d.machine, "pc-q35-7.2");
    assert_eq!(d.virt_type, "qemu");
    let tpm = d.tpm.as_ref().unwrap();
    assert_eq!((tpm.model.as_str(), tpm.backend.as_str()), ("tpm-crb", "emulator"));
    assert_eq!(tpm.version.as_deref(), Some("2.0"));
    let labels = d.labels.as_ref().unwrap();
    assert_eq!((labels.tenant.as_str(), labels.security_level), ("acme", 2));
    assert_eq!(labels.allowed_zones, ["eu-1", "eu-2"]);
    assert_eq!(labels.anti_affinity, ["rival"]);
    assert_eq!(d.serial_log.as_deref(), Some("/var/log/web1.console"));
    let spec = d.spec().unwrap();
    assert_eq!((spec.memory_mib, spec.vcpus, spec.machine), (128, 2, MachineType::Q35));
    let Boot::Domain { uuid } = &spec.boot else { panic!("not a domain") };
    assert_eq!(uuid.as_str(), "5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f", "canonical, lowercase");
}

#[test]
fn memory_units_convert_to_the_same_kib() {
    let with = |value: &str, unit: &str| {
        DomainFacts::parse(
            &XML.replace("<memory unit='KiB'>131072", &format!("<memory unit='{unit}'>{value}")),
        )
        .map(|d| d.memory_kib)
    };
    assert_eq!(with("128", "MiB"), Ok(131072));
    assert_eq!(with("134217728", "bytes"), Ok(131072));
    assert!(with("12x", "MiB").is_err());
    assert!(with("1", "parsecs").is_err());
}

#[test]
fn raw_qemu_arguments_and_foreign_machines_are_refused_by_name() {
    let pass = XML.replace(
        "</devices>",
        "</devices><qemu:commandline><qemu:arg value='-S'/></qemu:commandline>",
    );
    let err = DomainFacts::parse(&pass).unwrap().spec().unwrap_err();
    assert!(matches!(&err, DomainError::Passthrough { element, .. } if element == "commandline"));
    let arm = XML.replace("pc-q35-7.2", "virt-7.2");
    let err = DomainFacts::parse(&arm).unwrap().spec().unwrap_err().to_string();
    assert!(err.contains("virt-7.2") && err.contains("web1"), "{err}");
}

#[test]
fn bad_labels_and_bad_identity_name_the_problem() {
    let bad = XML.replace("security-level=\"2\"", "security-level=\"9\"");
    let err = DomainFacts::parse(&bad).unwrap_err().to_string();
    assert!(err.contains("web1") && err.contains("security level"), "{err}");
    let bad = XML.replace("5B0C6C3E-", "nope-");
    let err = DomainFacts::parse(&bad).unwrap().spec().unwrap_err().to_string();
    assert!(err.contains("uuid"), "{err}");
    let err = DomainFacts::parse("<domain><name>x</name></domain>").unwrap_err();
    assert_eq!(err, DomainError::Missing("uuid"));
    assert!(matches!(DomainFacts::parse("<domain"), Err(DomainError::Xml(_))));
}

#[test]
fn a_domain_without_labels_or_tpm_has_none() {
    let plain = XML
        .replace("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>", "")
        .replace("tenant=\"acme\"", "");
    let d = DomainFacts::parse(&plain).unwrap();
    assert_eq!(d.tpm, None);
    assert_eq!(d.labels.unwrap().tenant, "default");
}
