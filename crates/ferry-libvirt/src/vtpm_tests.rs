use super::*;

fn domain(tpm_backend: &str) -> DomainFacts {
    let xml = format!(
        "<domain type='qemu'><name>t1</name><uuid>5B0C6C3E-4f39-4a7e-9a52-6b8f7c1d2e3f</uuid>\
         <memory unit='MiB'>128</memory><vcpu>1</vcpu>\
         <os><type machine='pc'>hvm</type></os><devices>{tpm_backend}</devices></domain>"
    );
    DomainFacts::parse(&xml).unwrap()
}

fn uuid() -> DomainUuid {
    "5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f".parse().unwrap()
}

const EMULATED: &str = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>";
const KEPT: &str =
    "<tpm model='tpm-crb'><backend type='emulator' version='2.0' persistent_state='yes'/></tpm>";

#[test]
fn the_state_lives_under_the_canonical_uuid() {
    let root = Path::new("/var/lib/libvirt/swtpm");
    assert_eq!(state_dir(root, &uuid()), root.join("5b0c6c3e-4f39-4a7e-9a52-6b8f7c1d2e3f"));
}

#[test]
fn only_an_emulated_vtpm_moves() {
    let d = domain(EMULATED);
    carryable(&d.name, d.tpm.as_ref().unwrap()).unwrap();
    for backend in ["passthrough", "external"] {
        let d = domain(&format!("<tpm model='tpm-tis'><backend type='{backend}'/></tpm>"));
        let e = carryable(&d.name, d.tpm.as_ref().unwrap()).unwrap_err();
        assert!(e.to_string().contains(backend) && e.to_string().contains("t1"), "{e}");
    }
}

#[test]
fn network_filesystems_are_shared_and_local_ones_are_not() {
    assert_eq!(shared_filesystem(0x6969), Some("nfs"));
    assert_eq!(shared_filesystem(0x0102_1997), Some("9p"));
    assert!(shared_filesystem(0x6573_5546).is_some(), "fuse (glusterfs)");
    for local in [0xEF53 /* ext4 */, 0x5846_5342 /* xfs */, 0x0102_1994 /* tmpfs */] {
        assert_eq!(shared_filesystem(local), None, "{local:#x}");
    }
}

#[test]
fn a_local_state_directory_may_move() {
    // The machine's temporary directory is local (or tmpfs), never shared.
    let dir = std::env::temp_dir().join("ferry-vtpm-test-missing-dir");
    let d = domain(EMULATED);
    check_movable(&d, &uuid(), &dir).unwrap();
    assert!(shared_filesystem(filesystem_magic(&std::env::temp_dir()).unwrap()).is_none());
}

#[test]
fn the_source_copy_is_erased_unless_the_operator_keeps_it() {
    let root = Path::new("/r");
    let dir = root.join(uuid().as_str());
    assert_eq!(leftover(&domain(""), &uuid(), root), Leftover::None);
    assert_eq!(leftover(&domain(EMULATED), &uuid(), root), Leftover::Erase(dir.clone()));
    assert_eq!(leftover(&domain(KEPT), &uuid(), root), Leftover::Keep(dir));
}
