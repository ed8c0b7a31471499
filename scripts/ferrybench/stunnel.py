"""A pair of stunnel processes per migration (the stunnel transport): the
source QEMU talks plain TCP to a client stunnel, which speaks TLS 1.3 with a
client certificate to a server stunnel, which forwards to the destination
QEMU. Certificates are the x509 directory made for QEMU's native TLS."""

import os
import shutil
import subprocess

from .common import free_port, kill_proc, log, wait_listening
from .netns import Placement


def stunnel_binary():
    return shutil.which("stunnel4") or shutil.which("stunnel")


class Stunnel:
    def __init__(self, workdir, x509_dir, name, qemu_port, place=None):
        place = place or Placement()
        dst = place.dst_addr
        self.binary = stunnel_binary()
        self.d = os.path.join(workdir, "stunnel-" + name)
        os.makedirs(self.d)
        x = lambda n: os.path.join(x509_dir, n)
        self.tls_port, self.port = free_port(), free_port()
        common = ["foreground = yes", "pid =", "debug = 6", "sslVersionMin = TLSv1.3",
                  "CAfile = %s" % x("ca-cert.pem"), "verifyChain = yes"]
        server = common + ["[migration]", "accept = %s:%d" % (dst, self.tls_port),
                           "connect = %s:%d" % (dst, qemu_port),
                           "cert = %s" % x("server-cert.pem"), "key = %s" % x("server-key.pem"),
                           "requireCert = yes"]
        client = common + ["[migration]", "client = yes", "accept = 127.0.0.1:%d" % self.port,
                           "connect = %s:%d" % (dst, self.tls_port), "checkHost = localhost",
                           "cert = %s" % x("client-cert.pem"), "key = %s" % x("client-key.pem")]
        self.procs = []
        for role, conf, port, side in (("server", server, self.tls_port, place.dst),
                                       ("client", client, self.port, place.src)):
            path = os.path.join(self.d, role + ".conf")
            with open(path, "w") as f:
                f.write("\n".join(conf) + "\n")
            errf = open(os.path.join(self.d, role + ".log"), "wb")
            p = subprocess.Popen(side([self.binary, path]), stdout=errf, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            errf.close()
            self.procs.append(p)
            wait_listening(port, "stunnel " + role, p)

    def negotiated(self):
        """The protocol and cipher suite the client stunnel logged, if any."""
        try:
            with open(os.path.join(self.d, "client.log"), errors="replace") as f:
                for line in f:
                    if "ciphersuite" in line:
                        return line.split(": ", 1)[-1].strip()
        except OSError:
            pass
        return None

    def pids(self):
        return [p.pid for p in self.procs]

    def close(self):
        suite = self.negotiated()
        if suite:
            log("stunnel negotiated %s" % suite)
        for p in self.procs:
            kill_proc(p)
        self.procs = []
