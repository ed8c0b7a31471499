"""libvirt domains between the two libvirtds of a `ferry lab up --backend
libvirt`: libvirt's own peer-to-peer migration over TCP (`libvirt-tcp`),
the same with libvirt's native TLS (`libvirt-tls`, QEMU's tls-creds-x509
with mutual certificates), and Ferry carrying libvirt's migration
(`ferry-libvirt`). The same domain XML, guest and figures for all three.

libvirt writes the guest's serial console to a file without timestamps,
and after a migration the destination's QEMU appends to the same file; a
tailer thread timestamps each line as it appears (polled every 2 ms, the
same for every transport), and the guest blackout is the longest gap
between two heartbeats during the migration."""

import json
import os
import shutil
import subprocess
import threading
import time

from .common import MIGRATE_TIMEOUT_S, kill_proc, log
from .console import migration_result, parse_console, wait_ready
from .cpu import CpuSampler
from .plain import not_converged_result

# What libvirt's QEMU reads for `--tls` (qemu.conf migrate_tls_x509_cert_dir).
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem",
             "client-key.pem")
POLL_S = 0.002


class ConsoleTailer(threading.Thread):
    """Timestamps the lines appended to a console file (ms since the epoch)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.lines = []
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()

    def run(self):
        pending = b""
        f = None
        while not self.stop_flag.is_set():
            if f is None:
                try:
                    f = open(self.path, "rb")
                except FileNotFoundError:
                    time.sleep(POLL_S)
                    continue
            chunk = f.read()
            if chunk:
                ms = int(time.time() * 1000)
                pending += chunk
                *done, pending = pending.split(b"\n")
                with self.lock:
                    self.lines.extend((ms, d.decode("utf-8", "replace").strip()) for d in done)
            else:
                time.sleep(POLL_S)
        if f is not None:
            f.close()

    def get(self):
        with self.lock:
            return list(self.lines)

    def stop(self):
        self.stop_flag.set()
        self.join()


def split_at_blackout(lines, t0_ms, t1_ms):
    """The console as two parsed halves, cut at the longest gap between
    heartbeats that starts between the migrate command and its return."""
    c = parse_console(lines)
    hbs = c["hbs"]
    best, cut = -1, None
    for i in range(1, len(hbs)):
        gap = hbs[i][0] - hbs[i - 1][0]
        if t0_ms <= hbs[i - 1][0] <= t1_ms and gap > best:
            best, cut = gap, i
    if cut is None:
        return None, None
    src = dict(c, hbs=hbs[:cut], sweep_errors=0)
    dst = dict(c, hbs=hbs[cut:])
    return src, dst


def job_stats(text):
    """The figures of `virsh domjobinfo --completed`: bytes, total ms, downtime ms."""
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip().split()
        if not val:
            continue
        if key == "Time elapsed":
            out["total_ms"] = float(val[0])
        elif key == "Total downtime":
            out["downtime_ms"] = float(val[0])
        elif key == "Data processed":
            scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}.get(val[1], 1)
            out["bytes"] = int(float(val[0]) * scale)
    return out


class LibvirtRunner:
    def __init__(self, ferry, workdir, memory_mib, x509_dir):
        self.ferry = ferry
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.labdir = os.path.join(workdir, "libvirt-lab")
        r = subprocess.run([ferry, "lab", "up", "--dir", self.labdir, "--hosts", "2",
                            "--backend", "libvirt", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=180)
        if r.returncode != 0:
            raise RuntimeError("lab up --backend libvirt failed: %s" % r.stderr.decode())
        self.lab = json.loads(r.stdout)
        self.hosts = {h["name"]: h for h in self.lab["hosts"]}
        for h in self.lab["hosts"]:
            tls = os.path.join(h["libvirt"]["dir"], "etc", "migrate-tls")
            os.makedirs(tls, exist_ok=True)
            for f in TLS_FILES:
                shutil.copy2(os.path.join(x509_dir, f), tls)
        self.live = []
        self.migrating = None

    def uri(self, host):
        return "qemu+unix:///system?socket=%s/run/libvirt-sock" % self.hosts[host]["libvirt"]["dir"]

    def virsh(self, host, *args, check=True):
        r = subprocess.run(["virsh", "-c", self.uri(host)] + list(args), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=MIGRATE_TIMEOUT_S)
        if check and r.returncode != 0:
            raise RuntimeError("virsh %s on %s: %s" % (" ".join(args), host, r.stderr.decode()))
        return r.stdout.decode()

    def fer(self, *args, check=True):
        argv = [self.ferry] + list(args) + ["--client-config", self.lab["client_config"], "--json"]
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=MIGRATE_TIMEOUT_S)
        if check and r.returncode != 0:
            raise RuntimeError("%s: %s %s" % (" ".join(argv), r.stdout.decode(), r.stderr.decode()))
        return r

    def pids(self, method):
        """libvirtds always; the agents too when Ferry carries the migration."""
        pids = [h["libvirt"]["pid"] for h in self.lab["hosts"]]
        if method == "ferry-libvirt":
            for h in self.lab["hosts"]:
                with open(h["pid_file"]) as f:
                    pids.append(int(f.read().strip()))
        return pids

    def migrate_argv(self, name, method):
        if method == "ferry-libvirt":
            return [self.ferry, "migrate", name, "--to", "host2", "--host", "host1",
                    "--client-config", self.lab["client_config"], "--json"]
        argv = ["virsh", "-c", self.uri("host1"), "migrate", "--live", "--p2p", "--persistent",
                "--undefinesource", name, self.uri("host2"), "--migrateuri", "tcp://127.0.0.1"]
        return argv + (["--tls"] if method == "libvirt-tls" else [])

    def cancel(self, name, method):
        if method != "ferry-libvirt":
            self.virsh("host1", "domjobabort", name, check=False)
            return
        r = self.fer("migrations", "list", "--host", "host1", check=False)
        try:
            migs = json.loads(r.stdout).get("migrations", [])
        except ValueError:
            migs = []
        for m in migs:
            if m.get("vm") == name and m.get("state") not in ("completed", "failed", "rolled_back"):
                self.fer("migrations", "cancel", m["id"], "--host", "host1", check=False)

    def run(self, name, cmdline, settle_s, method, converge_s):
        r = subprocess.run([self.ferry, "lab", "domain", "--dir", self.labdir, "--host", "host1",
                            "--name", name, "--memory-mib", str(self.memory_mib),
                            "--cmdline", cmdline, "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("ferry lab domain %s: %s" % (name, r.stderr.decode()))
        self.live.append(name)
        tail = ConsoleTailer(json.loads(r.stdout)["console"])
        tail.start()
        try:
            return self.measure(name, method, tail, settle_s, converge_s)
        finally:
            tail.stop()
            self.cleanup()

    def measure(self, name, method, tail, settle_s, converge_s):
        wait_ready(tail.get, name + " (libvirt src)")
        time.sleep(settle_s)
        prefix = "guest=%s," % name
        sampler = CpuSampler(self.pids(method),
                             match=lambda argv: any(a.startswith(prefix) for a in argv))
        sampler.start()
        t0 = time.time()
        err = open(os.path.join(self.workdir, name + ".migrate.err"), "wb")
        p = subprocess.Popen(self.migrate_argv(name, method), stdout=subprocess.PIPE, stderr=err,
                             start_new_session=True)
        self.migrating = p
        cancelled = None
        try:
            try:
                out, _ = p.communicate(timeout=converge_s or MIGRATE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                cancelled = {"nc_ms": (time.time() - t0) * 1000.0}
                log("  not completed after %.0f s: cancelling" % (time.time() - t0))
                self.cancel(name, method)
                out, _ = p.communicate(timeout=MIGRATE_TIMEOUT_S)
            t_ret = time.time()
        finally:
            cpu_s, cpu_by = sampler.stop()
            if p.poll() is None:
                kill_proc(p)
            self.migrating = None
            err.close()
        if cancelled is not None:
            return not_converged_result(cancelled, cpu_s, cpu_by)
        if p.returncode != 0:
            with open(os.path.join(self.workdir, name + ".migrate.err")) as f:
                raise RuntimeError("%s migration failed (rc=%d): %s %s" % (
                    method, p.returncode, out.decode(), f.read()))
        state = self.virsh("host2", "domstate", name).strip()
        if state != "running":
            raise RuntimeError("%s: the domain is %s on host2" % (method, state))
        stats = job_stats(self.virsh("host2", "domjobinfo", name, "--completed"))
        # Heartbeats on the destination for a while, then cut at the blackout.
        deadline = time.time() + 10
        while time.time() < deadline:
            hbs = parse_console(tail.get())["hbs"]
            if hbs and hbs[-1][0] > t_ret * 1000 + 1000:
                break
            time.sleep(0.05)
        src, dst = split_at_blackout(tail.get(), t0 * 1000, t_ret * 1000)
        if src is None:
            raise RuntimeError("%s: no heartbeats around the migration" % method)
        extra = {}
        if method == "ferry-libvirt":
            extra["gate_hold_ms"] = self.gate_hold_ms(out)
        return migration_result(stats.get("bytes"), stats.get("total_ms"), (t_ret - t0) * 1000.0,
                                stats.get("downtime_ms"), src, dst, cpu_s, cpu_by, **extra)

    def gate_hold_ms(self, migrate_stdout):
        """How long host2's resume gate held the loaded VM (its record)."""
        try:
            mid = json.loads(migrate_stdout)["id"]
            shown = self.fer("migrations", "show", mid, "--host", "host2")
            return json.loads(shown.stdout).get("gate_hold_ms")
        except (ValueError, KeyError, RuntimeError) as e:
            log("  no gate hold time: %s" % e)
            return None

    def cleanup(self):
        if self.migrating is not None:
            kill_proc(self.migrating)
            self.migrating = None
        for name in self.live:
            for h in ("host1", "host2"):
                self.virsh(h, "destroy", name, check=False)
                self.virsh(h, "undefine", name, check=False)
        self.live = []

    def close(self):
        self.cleanup()
        subprocess.run([self.ferry, "lab", "down", "--dir", self.labdir], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
