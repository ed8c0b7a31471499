"""A private sshd and `ssh -L` tunnels through it (the SSH transport)."""

import os
import shutil
import subprocess

from .common import free_port, kill_proc, run_quiet, wait_listening
from .netns import Placement


class SshServer:
    """A private sshd on a free port (temp host key, temp authorized key, own
    config; no system configuration is touched) and `ssh -L` tunnels through
    it. sshd runs on the destination side (place), the ssh clients on the
    source side."""

    def __init__(self, workdir, place=None):
        self.place = place or Placement()
        self.sshd_bin = shutil.which("sshd") or "/usr/sbin/sshd"
        self.d = os.path.join(workdir, "ssh")
        os.makedirs(self.d)
        j = lambda n: os.path.join(self.d, n)
        for k in ("host_key", "client_key"):
            run_quiet(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", j(k)])
        shutil.copy(j("client_key.pub"), j("authorized_keys"))
        self.port = free_port()
        with open(j("sshd_config"), "w") as f:
            f.write("\n".join([
                "Port %d" % self.port, "ListenAddress %s" % self.place.dst_addr,
                "HostKey %s" % j("host_key"),
                "AuthorizedKeysFile %s" % j("authorized_keys"), "PermitRootLogin prohibit-password",
                "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
                "StrictModes no", "Ciphers aes128-gcm@openssh.com", "AllowTcpForwarding yes",
                "X11Forwarding no", "PrintMotd no", "PidFile %s" % j("sshd.pid"),
                "LogLevel ERROR", ""]))
        # sshd's privilege separation needs its (compile-time) empty directory
        self.made_run_dir = False
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_dir = True
        errf = open(j("sshd.stderr"), "wb")
        sshd = [self.sshd_bin, "-f", j("sshd_config"), "-D", "-e"]
        self.proc = subprocess.Popen(self.place.dst(sshd), stdout=subprocess.DEVNULL, stderr=errf,
                                     start_new_session=True)
        errf.close()
        wait_listening(self.port, "sshd", self.proc)
        self.tunnels = []

    def forward(self, local_port, remote_port):
        j = lambda n: os.path.join(self.d, n)
        errf = open(j("ssh-%d.stderr" % local_port), "wb")
        dst = self.place.dst_addr
        p = subprocess.Popen(self.place.src([
            "ssh", "-N", "-F", "/dev/null", "-L", "%d:%s:%d" % (local_port, dst, remote_port),
            "-c", "aes128-gcm@openssh.com", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes",
            "-o", "LogLevel=ERROR", "-i", j("client_key"), "-p", str(self.port), "root@" + dst]),
            stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        errf.close()
        self.tunnels.append(p)
        wait_listening(local_port, "ssh -L", p)
        return p

    def close_tunnel(self, p):
        kill_proc(p)
        if p in self.tunnels:
            self.tunnels.remove(p)

    def close(self):
        for p in list(self.tunnels):
            kill_proc(p)
        self.tunnels = []
        kill_proc(self.proc)
        if self.made_run_dir:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
