"""Transport names (--transports), their labels, and which guests they run on."""

TRANSPORTS = ["plain-unix", "plain-tcp", "plain-multifd", "plain-postcopy", "qemu-tls",
              "qemu-tls-multifd", "ssh", "stunnel", "ferry", "ferry-multi", "ferry-postcopy", "ferry-vtpm",
              "libvirt-tcp", "libvirt-tls", "ferry-libvirt"]
# existing secure transports Ferry is compared with
SECURE = ("qemu-tls", "qemu-tls-multifd", "ssh", "stunnel")
# Ferry's variants, each compared with the best of SECURE in its round
FERRY = ("ferry", "ferry-multi", "ferry-postcopy", "ferry-vtpm")
# post-copy only means something for a guest that does not converge otherwise
POSTCOPY = ("plain-postcopy", "ferry-postcopy")
MULTIFD = ("plain-multifd", "qemu-tls-multifd", "ferry-multi")
TLS = ("qemu-tls", "qemu-tls-multifd")
# a libvirt domain between two libvirtds (a lab of its own), compared among themselves
LIBVIRT = ("libvirt-tcp", "libvirt-tls", "ferry-libvirt")
# transports that need the x509 directory
X509 = TLS + ("stunnel", "libvirt-tls")

GUESTS = ("idle", "dirtying", "fast")


def label(t, streams, netns=False):
    """Table label of a transport; streams = QEMU multifd channels (--streams);
    netns: between namespaced hosts rather than on loopback."""
    return {
        "plain-unix": "plain QEMU, unix socket",
        "plain-tcp": "plain QEMU, TCP" + ("" if netns else " loopback"),
        "plain-multifd": "plain QEMU, multifd ×%d (TCP)" % streams,
        "plain-postcopy": "plain QEMU, post-copy (TCP)",
        "qemu-tls": "QEMU native TLS (x509, mutual)",
        "qemu-tls-multifd": "QEMU native TLS, multifd ×%d" % streams,
        "ssh": "SSH tunnel (aes128-gcm)",
        "stunnel": "stunnel (TLS 1.3, mutual)",
        "ferry": "Ferry (mTLS, agents)",
        "ferry-multi": "Ferry, multifd ×%d (%d TLS streams)" % (streams, streams + 1),
        "ferry-postcopy": "Ferry, post-copy",
        "ferry-vtpm": "Ferry, VM with a vTPM (swtpm, tpm-crb)",
        "libvirt-tcp": "libvirt p2p, plain TCP",
        "libvirt-tls": "libvirt p2p --tls (x509, mutual)",
        "ferry-libvirt": "Ferry carrying libvirt (mTLS, agents)",
    }[t]


def runs_on(t, guest):
    """Whether transport t runs on guest kind guest (idle, dirtying, fast)."""
    if t in LIBVIRT:
        return guest != "fast"
    return guest == "fast" or t not in POSTCOPY
