"""QEMU native TLS: the x509 directory tls-creds-x509 expects, and a probe
migration that reads what GnuTLS negotiates."""

import os
import socket
import subprocess
import threading
import time

from .common import free_port, kill_proc, run_quiet, wait_listening
from .qmp import QMP


def make_x509_dir(workdir):
    """A CA and a server and a client certificate (ECDSA P-256) in the file
    layout QEMU's tls-creds-x509 expects."""
    d = os.path.join(workdir, "x509")
    os.makedirs(d)
    j = lambda n: os.path.join(d, n)
    run_quiet(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", j("ca-key.pem")])
    run_quiet(["openssl", "req", "-x509", "-new", "-key", j("ca-key.pem"), "-subj", "/CN=ferry-bench CA",
               "-days", "2", "-out", j("ca-cert.pem"),
               "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
    for role, eku in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = j(role + ".ext")
        with open(ext, "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    "extendedKeyUsage=%s\n"
                    "subjectAltName=DNS:localhost,IP:127.0.0.1\n" % eku)
        run_quiet(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                   "-out", j(role + "-key.pem")])
        run_quiet(["openssl", "req", "-new", "-key", j(role + "-key.pem"), "-subj",
                   "/CN=localhost", "-out", j(role + ".csr")])
        run_quiet(["openssl", "x509", "-req", "-in", j(role + ".csr"), "-CA", j("ca-cert.pem"),
                   "-CAkey", j("ca-key.pem"), "-CAcreateserial", "-days", "2",
                   "-out", j(role + "-cert.pem"), "-extfile", ext])
    return d


TLS_SUITES = {0x1301: "TLS_AES_128_GCM_SHA256", 0x1302: "TLS_AES_256_GCM_SHA384",
              0x1303: "TLS_CHACHA20_POLY1305_SHA256", 0xC02B: "ECDHE-ECDSA-AES128-GCM-SHA256",
              0xC02C: "ECDHE-ECDSA-AES256-GCM-SHA384", 0xCCA9: "ECDHE-ECDSA-CHACHA20-POLY1305"}


def parse_server_hello(data):
    """(protocol, cipher suite) from the first TLS record the server sent."""
    if len(data) < 5 + 4 + 2 + 32 + 1 or data[0] != 0x16 or data[5] != 0x02:
        return None
    i = 5 + 4
    version = (data[i] << 8) | data[i + 1]
    i += 2 + 32
    i += 1 + data[i]
    suite = (data[i] << 8) | data[i + 1]
    i += 2 + 1
    proto = {0x0303: "TLS 1.2", 0x0302: "TLS 1.1"}.get(version, hex(version))
    if i + 2 <= len(data):
        end = i + 2 + ((data[i] << 8) | data[i + 1])
        i += 2
        while i + 4 <= min(end, len(data)):
            etype, elen = (data[i] << 8) | data[i + 1], (data[i + 2] << 8) | data[i + 3]
            if etype == 0x002B and elen == 2 and data[i + 4:i + 6] == b"\x03\x04":
                proto = "TLS 1.3"
            i += 4 + elen
    return proto, TLS_SUITES.get(suite, hex(suite))


def probe_qemu_tls(workdir, x509_dir, procs):
    """Migrate a tiny paused VM with tls-creds through a relay that reads the
    server's first TLS record, to report what QEMU's GnuTLS negotiates."""
    qs = []
    try:
        for tag, endpoint in (("probe-src", "client"), ("probe-dst", "server")):
            qmp = os.path.join(workdir, tag + ".qmp")
            argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "32",
                    "-display", "none", "-nodefaults", "-S",
                    "-qmp", "unix:%s,server=on,wait=off" % qmp,
                    "-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on"
                    % (x509_dir, endpoint)]
            if endpoint == "server":
                argv += ["-incoming", "defer"]
            errf = open(os.path.join(workdir, tag + ".stderr"), "wb")
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
            errf.close()
            procs.append(p)
            qs.append(QMP(qmp))
        sq, dq = qs
        port, rport = free_port(), free_port()
        dq.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
        dq.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:%d" % port})
        wait_listening(port, "probe destination QEMU")
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.bind(("127.0.0.1", rport))
        lsock.listen(1)
        lsock.settimeout(30)
        first = bytearray()

        def pump(a, b, capture):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    if capture and len(first) < 4096:
                        first.extend(data)
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for x in (a, b):
                    try:
                        x.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        def relay():
            try:
                c, _ = lsock.accept()
                u = socket.create_connection(("127.0.0.1", port))
            except OSError:
                return
            t = threading.Thread(target=pump, args=(c, u, False), daemon=True)
            t.start()
            pump(u, c, True)
            t.join(5)
        th = threading.Thread(target=relay, daemon=True)
        th.start()
        sq.cmd("migrate-set-parameters", {"tls-creds": "tls0", "tls-hostname": "localhost"})
        sq.cmd("migrate", {"uri": "tcp:127.0.0.1:%d" % rport})
        deadline = time.time() + 60
        while True:
            st = sq.cmd("query-migrate").get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError("TLS probe migration %s: %s" % (st, sq.cmd("query-migrate")))
            time.sleep(0.05)
        lsock.close()
        hello = parse_server_hello(bytes(first))
        return "%s, %s" % hello if hello else None
    finally:
        for q in qs:
            q.close()
        for p in procs[-2:]:
            kill_proc(p)
