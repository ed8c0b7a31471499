#!/usr/bin/env python3
"""Ferry benchmark: the same live migration of the same test guest through
plain QEMU (unix socket, loopback TCP), QEMU's native TLS (tls-creds-x509,
mutual certificates), an SSH tunnel (aes128-gcm) and Ferry (mTLS, agents),
interleaved on the same machine.

For each guest kind (idle-after-fill, dirtying) and each round it runs every
selected transport once, in an order that rotates per round, and reports
medians and min-max of:

  * throughput   bytes / total migration time
                 QEMU transports: ram.transferred / total-time from query-migrate
                 ferry: bytes / total_ms from the migration record
  * wall         wall-clock from issuing the migrate command to the destination
                 running (QEMU transports: migrate QMP -> `cont` returned;
                 ferry: `ferry migrate` start -> command returned, dest VM listed running)
  * blackout     guest-observed: first HB line on the destination console minus
                 the last HB line on the source console (ms)
  * qemu downtime as reported by QEMU (query-migrate downtime / qemu_downtime_ms)
  * CPU s per GB utime+stime (from /proc/PID/stat, sampled every 0.1 s while the
                 migration runs) of every process involved: both QEMUs, plus
                 sshd (and its session children) and ssh for the SSH tunnel, plus
                 both agents (and their children) for Ferry; divided by the
                 bytes transferred (GB = 10^9 bytes).  The source QEMU and the
                 helpers count from the migrate command on; the destination QEMU
                 counts from its launch (for Ferry it is launched by the agent
                 inside the migration).

Python 3 stdlib only (plus openssl for qemu-tls and OpenSSH for ssh).  Usage:
    python3 scripts/bench.py --rounds 3 --write
    python3 scripts/bench.py --quick
    python3 scripts/bench.py --transports plain-unix,qemu-tls,ferry --guests idle
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FERRY = os.path.join(ROOT, "target", "debug", "ferry")
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")
START_MARK = "<!-- bench:spine:start -->"
END_MARK = "<!-- bench:spine:end -->"
MAX_BW = 68719476736  # 64 GiB/s, what Ferry's agents set for max_bandwidth_mib_s = 0
DOWNTIME_LIMIT_MS = 300
HB_MS = 1
READY_TIMEOUT_S = 180
MIGRATE_TIMEOUT_S = 600


def now_ms():
    return int(time.time() * 1000)


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


# ---------------------------------------------------------------- console logs

def parse_console(lines):
    """lines: iterable of (ms, text). Returns dict with ready_ms, hbs [(ms, seq)], sweep errors."""
    out = {"ready_ms": None, "hbs": [], "sweep_errors": 0, "sweeps": 0}
    for ms, text in lines:
        if text.startswith("READY") and out["ready_ms"] is None:
            out["ready_ms"] = ms
        elif text.startswith("HB "):
            seq = None
            for tok in text.split():
                if tok.startswith("seq="):
                    try:
                        seq = int(tok[4:])
                    except ValueError:
                        pass
            out["hbs"].append((ms, seq))
        elif text.startswith("SWEEP"):
            out["sweeps"] += 1
            for tok in text.split():
                if tok.startswith("errors="):
                    try:
                        out["sweep_errors"] += int(tok[7:])
                    except ValueError:
                        pass
    return out


def read_console_file(path):
    lines = []
    try:
        with open(path, "r", errors="replace") as f:
            for raw in f:
                parts = raw.rstrip("\n").split(" ", 1)
                if len(parts) != 2:
                    continue
                try:
                    lines.append((int(parts[0]), parts[1].strip()))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return lines


def blackout(src, dst):
    """Guest-observed blackout and the HB seq numbers around it.

    Returns (blackout_ms, last_src_seq, first_dst_seq, progress_ms, replayed):
    blackout_ms  first HB on the destination minus the last HB on the source;
    progress_ms  first destination HB whose seq is beyond the source's last one,
                 minus the last source HB (differs from blackout_ms only when the
                 destination re-prints heartbeats the source already printed);
    replayed     how many destination HBs had seq <= the source's last seq.
    """
    if not src["hbs"] or not dst["hbs"]:
        return None, None, None, None, None
    last_src_ms, last_src_seq = src["hbs"][-1]
    first_dst_ms, first_dst_seq = dst["hbs"][0]
    progress_ms = None
    replayed = 0
    for ms, seq in dst["hbs"]:
        if seq is not None and last_src_seq is not None and seq <= last_src_seq:
            replayed += 1
            continue
        progress_ms = ms - last_src_ms
        break
    return first_dst_ms - last_src_ms, last_src_seq, first_dst_seq, progress_ms, replayed


# ---------------------------------------------------------------- plain QEMU

class SerialReader(threading.Thread):
    def __init__(self, path):
        super().__init__(daemon=True)
        self.path = path
        self.lines = []
        self.lock = threading.Lock()
        self.stop_flag = False
        self.sock = None

    def connect(self, timeout=20):
        deadline = time.time() + timeout
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(self.path)
                s.settimeout(0.5)
                self.sock = s
                return
            except OSError:
                s.close()
                if time.time() > deadline:
                    raise RuntimeError("cannot connect to serial socket %s" % self.path)
                time.sleep(0.05)

    def run(self):
        buf = b""
        while not self.stop_flag:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break
            ts = now_ms()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode("utf-8", "replace").strip()
                if text:
                    with self.lock:
                        self.lines.append((ts, text))

    def snapshot(self):
        with self.lock:
            return list(self.lines)

    def close(self):
        self.stop_flag = True
        try:
            self.sock.close()
        except Exception:
            pass


class QMP:
    def __init__(self, path, timeout=20):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline:
                    raise RuntimeError("cannot connect to QMP %s" % path)
                time.sleep(0.05)
        self.sock.settimeout(30)
        self.f = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" in msg:
                continue
            return msg

    def cmd(self, name, args=None):
        req = {"execute": name}
        if args is not None:
            req["arguments"] = args
        self.f.write((json.dumps(req) + "\n").encode())
        self.f.flush()
        resp = self._read()
        if "error" in resp:
            raise RuntimeError("QMP %s failed: %s" % (name, resp["error"]))
        return resp.get("return")

    def close(self):
        try:
            self.sock.close()
        except Exception:
            pass


class PlainRunner:
    """Plain QEMU-to-QEMU migrations: plain-unix, plain-tcp, qemu-tls, ssh."""

    def __init__(self, workdir, image, memory_mib, procs, x509_dir=None, ssh=None):
        self.workdir = workdir
        self.image = image
        self.memory_mib = memory_mib
        self.procs = procs  # shared list for global cleanup
        self.x509_dir = x509_dir
        self.ssh = ssh

    def launch(self, tag, cmdline, incoming, extra=()):
        qmp = os.path.join(self.workdir, tag + ".qmp")
        ser = os.path.join(self.workdir, tag + ".serial")
        for p in (qmp, ser):
            if os.path.exists(p):
                os.unlink(p)
        argv = ["qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
                "-m", str(self.memory_mib), "-display", "none", "-nodefaults",
                "-kernel", self.image, "-append", cmdline,
                "-qmp", "unix:%s,server=on,wait=off" % qmp,
                "-chardev", "socket,id=s,path=%s,server=on,wait=off" % ser,
                "-serial", "chardev:s"]
        if incoming:
            argv += ["-incoming", "defer", "-S"]
        argv += list(extra)
        errf = open(os.path.join(self.workdir, tag + ".stderr"), "wb")
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        errf.close()
        self.procs.append(p)
        deadline = time.time() + 20
        while not (os.path.exists(qmp) and os.path.exists(ser)):
            if p.poll() is not None:
                raise RuntimeError("qemu %s exited early (rc=%s)" % (tag, p.returncode))
            if time.time() > deadline:
                raise RuntimeError("qemu %s sockets did not appear" % tag)
            time.sleep(0.05)
        reader = SerialReader(ser)
        reader.connect()
        reader.start()
        return p, QMP(qmp), reader

    def tls_object(self, endpoint):
        return ["-object", "tls-creds-x509,id=tls0,dir=%s,endpoint=%s,verify-peer=on"
                % (self.x509_dir, endpoint)]

    def run(self, name, cmdline, settle_s, transport="plain-unix"):
        src = dst = tunnel = sampler = None
        tls = transport == "qemu-tls"
        try:
            src = self.launch(name + "-src", cmdline, incoming=False,
                              extra=self.tls_object("client") if tls else ())
            sp, sq, sr = src
            wait_ready(lambda: sr.snapshot(), name + " (plain src)")
            time.sleep(settle_s)
            dst = self.launch(name + "-dst", cmdline, incoming=True,
                              extra=self.tls_object("server") if tls else ())
            dp, dq, dr = dst
            if tls:
                dq.cmd("migrate-set-parameters", {"tls-creds": "tls0"})
            if transport == "plain-unix":
                sock = os.path.join(self.workdir, name + ".mig")
                if os.path.exists(sock):
                    os.unlink(sock)
                dq.cmd("migrate-incoming", {"uri": "unix:" + sock})
                deadline = time.time() + 10
                while not os.path.exists(sock):
                    if time.time() > deadline:
                        raise RuntimeError("incoming migration socket did not appear")
                    time.sleep(0.01)
                uri = "unix:" + sock
            else:
                port = free_port()
                dq.cmd("migrate-incoming", {"uri": "tcp:127.0.0.1:%d" % port})
                wait_listening(port, "destination QEMU", dp)
                uri = "tcp:127.0.0.1:%d" % port
                if transport == "ssh":
                    lport = free_port()
                    tunnel = self.ssh.forward(lport, port)
                    uri = "tcp:127.0.0.1:%d" % lport
            params = {"max-bandwidth": MAX_BW, "downtime-limit": DOWNTIME_LIMIT_MS}
            if tls:
                params.update({"tls-creds": "tls0", "tls-hostname": "localhost"})
            sq.cmd("migrate-set-parameters", params)
            roots = [sp.pid, dp.pid]
            if transport == "ssh":
                roots += [self.ssh.proc.pid, tunnel.pid]
            sampler = CpuSampler(roots, zero=[dp.pid])
            sampler.start()
            t0 = time.time()
            sq.cmd("migrate", {"uri": uri})
            src_info = None
            deadline = time.time() + MIGRATE_TIMEOUT_S
            while True:
                info = sq.cmd("query-migrate")
                st = info.get("status")
                if st == "completed":
                    src_info = info
                    break
                if st in ("failed", "cancelled"):
                    raise RuntimeError("plain migration %s: %s" % (st, info))
                if time.time() > deadline:
                    raise RuntimeError("plain migration timed out")
                time.sleep(0.005)
            while True:
                info = dq.cmd("query-migrate")
                st = info.get("status")
                if st == "completed":
                    break
                if st in ("failed", "cancelled"):
                    raise RuntimeError("plain incoming migration %s: %s" % (st, info))
                if time.time() > deadline:
                    raise RuntimeError("plain incoming migration timed out")
                time.sleep(0.005)
            dq.cmd("cont")
            wall_ms = (time.time() - t0) * 1000.0
            cpu_s, cpu_by = sampler.stop()
            sampler = None
            status = dq.cmd("query-status")
            if status.get("status") != "running":
                raise RuntimeError("plain destination not running: %s" % status)
            # give the destination time to print heartbeats and a sweep
            srcc = parse_console(sr.snapshot())
            wait_hbs(lambda: dr.snapshot(), name + " (plain dst)",
                     srcc["hbs"][-1][1] if srcc["hbs"] else None)
            srcc = parse_console(sr.snapshot())
            dstc = parse_console(dr.snapshot())
            bo, lseq, fseq, prog, rep = blackout(srcc, dstc)
            ram = src_info.get("ram", {})
            total = src_info.get("total-time")
            return {
                "bytes": ram.get("transferred"),
                "total_ms": total,
                "throughput": ram.get("transferred") / (total / 1000.0) if total else None,
                "wall_ms": wall_ms,
                "downtime_ms": src_info.get("downtime"),
                "blackout_ms": bo,
                "last_src_seq": lseq,
                "first_dst_seq": fseq,
                "progress_ms": prog,
                "replayed": rep,
                "sweep_errors": srcc["sweep_errors"] + dstc["sweep_errors"],
                "cpu_s": cpu_s,
                "cpu_by": cpu_by,
            }
        finally:
            if sampler is not None:
                sampler.stop_flag.set()
            if tunnel is not None:
                self.ssh.close_tunnel(tunnel)
            for t in (src, dst):
                if t is None:
                    continue
                p, q, r = t
                q.close()
                r.close()
                kill_proc(p)


def kill_proc(p):
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            try:
                p.kill()
            except OSError:
                pass
    try:
        p.wait(timeout=10)
    except Exception:
        pass


def wait_ready(get_lines, what):
    deadline = time.time() + READY_TIMEOUT_S
    while True:
        c = parse_console(get_lines())
        if c["ready_ms"] is not None and c["hbs"]:
            return
        if time.time() > deadline:
            raise RuntimeError("%s: guest never printed READY" % what)
        time.sleep(0.1)


def wait_hbs(get_lines, what, after_seq=None, n=200, timeout=30):
    """Wait for n heartbeats on the destination and one beyond the source's last seq."""
    deadline = time.time() + timeout
    while True:
        c = parse_console(get_lines())
        beyond = after_seq is None or any(s is not None and s > after_seq for _, s in c["hbs"])
        if len(c["hbs"]) >= n and beyond:
            return
        if time.time() > deadline:
            if c["hbs"]:
                return
            raise RuntimeError("%s: no heartbeat after resume" % what)
        time.sleep(0.05)



# ---------------------------------------------------------------- CPU accounting

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid):
    """(ppid, utime+stime ticks, starttime) of a process, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] = state (field 3); utime/stime are fields 14/15, starttime 22
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def read_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class CpuSampler(threading.Thread):
    """Sums utime+stime of a set of processes while a migration runs.

    roots   pids counted with all their descendants;
    match   optional predicate on a process's argv, for processes outside the
            tree (QEMU daemonizes, so the agents' QEMUs are reparented to init);
    zero    pids counted from their start (baseline 0) rather than from now.
    Processes that appear after the first scan are counted from their start.
    /proc is scanned every `interval` s; a process that exits loses at most
    the CPU it used since the last scan.
    """

    def __init__(self, roots, match=None, zero=(), interval=0.1):
        super().__init__(daemon=True)
        self.roots = set(p for p in roots if p)
        self.match = match
        self.zero = set(zero)
        self.interval = interval
        self.first = {}   # (pid, starttime) -> ticks at first sighting
        self.last = {}    # (pid, starttime) -> latest ticks
        self.names = {}
        self.cmd_cache = {}
        self.stop_flag = threading.Event()
        self.scans = 0

    def scan(self):
        stats = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            st = read_stat(int(d))
            if st is not None:
                stats[int(d)] = st
        children = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        included = set()
        todo = [p for p in self.roots if p in stats]
        while todo:
            p = todo.pop()
            if p in included:
                continue
            included.add(p)
            todo.extend(children.get(p, []))
        if self.match is not None:
            for pid, (_, _, start) in stats.items():
                if pid in included:
                    continue
                key = (pid, start)
                if key not in self.cmd_cache:
                    self.cmd_cache[key] = self.match(read_cmdline(pid))
                if self.cmd_cache[key]:
                    included.add(pid)
        for pid in included:
            _, ticks, start = stats[pid]
            key = (pid, start)
            if key not in self.first:
                self.first[key] = 0 if (self.scans > 0 or pid in self.zero) else ticks
                self.names[key] = os.path.basename((read_cmdline(pid) or ["?"])[0])
            self.last[key] = ticks
        self.scans += 1

    def start(self):
        self.scan()
        super().start()

    def run(self):
        while not self.stop_flag.wait(self.interval):
            self.scan()

    def stop(self):
        """Final scan; returns (cpu seconds, {process name: seconds})."""
        self.stop_flag.set()
        self.join()
        self.scan()
        by_name = {}
        total = 0
        for key, t in self.last.items():
            d = t - self.first[key]
            total += d
            by_name[self.names[key]] = by_name.get(self.names[key], 0) + d / CLK_TCK
        return total / CLK_TCK, by_name


# ---------------------------------------------------------------- transports

TRANSPORTS = ["plain-unix", "plain-tcp", "qemu-tls", "ssh", "ferry"]
LABELS = {
    "plain-unix": "plain QEMU, unix socket",
    "plain-tcp": "plain QEMU, TCP loopback",
    "qemu-tls": "QEMU native TLS (x509, mutual)",
    "ssh": "SSH tunnel (aes128-gcm)",
    "ferry": "Ferry (mTLS, agents)",
}
SECURE = ("qemu-tls", "ssh")  # existing secure transports Ferry is compared with


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_listening(port):
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, StopIteration):
            pass
    return False


def wait_listening(port, what, proc=None, timeout=20):
    deadline = time.time() + timeout
    while not tcp_listening(port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("%s exited (rc=%s) before listening on %d" % (what, proc.returncode, port))
        if time.time() > deadline:
            raise RuntimeError("%s not listening on port %d" % (what, port))
        time.sleep(0.02)


def run_quiet(argv, **kw):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed: %s" % (" ".join(argv), r.stderr.decode()))
    return r


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


class SshServer:
    """A private sshd on a free loopback port (temp host key, temp authorized
    key, own config; no system configuration is touched) and `ssh -L` tunnels
    through it."""

    def __init__(self, workdir):
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
                "Port %d" % self.port, "ListenAddress 127.0.0.1", "HostKey %s" % j("host_key"),
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
        self.proc = subprocess.Popen([self.sshd_bin, "-f", j("sshd_config"), "-D", "-e"],
                                     stdout=subprocess.DEVNULL, stderr=errf, start_new_session=True)
        errf.close()
        wait_listening(self.port, "sshd", self.proc)
        self.tunnels = []

    def forward(self, local_port, remote_port):
        j = lambda n: os.path.join(self.d, n)
        errf = open(j("ssh-%d.stderr" % local_port), "wb")
        p = subprocess.Popen(["ssh", "-N", "-F", "/dev/null",
                              "-L", "%d:127.0.0.1:%d" % (local_port, remote_port),
                              "-c", "aes128-gcm@openssh.com", "-o", "StrictHostKeyChecking=no",
                              "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                              "-o", "ExitOnForwardFailure=yes", "-o", "IdentitiesOnly=yes",
                              "-o", "LogLevel=ERROR", "-i", j("client_key"),
                              "-p", str(self.port), "root@127.0.0.1"],
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


# ---------------------------------------------------------------- Ferry

class FerryRunner:
    def __init__(self, ferry, lab, workdir, memory_mib):
        self.ferry = ferry
        self.lab = lab
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.hosts = {h["name"]: h for h in lab["hosts"]}
        self.live = []  # (vm, host) to stop on failure

    def agent_pids(self):
        pids = []
        for h in self.lab["hosts"]:
            try:
                with open(h["pid_file"]) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError, KeyError):
                log("warning: no agent pid for %s; its CPU is not counted" % h.get("name"))
        return pids

    def fer(self, *args, check=True, timeout=MIGRATE_TIMEOUT_S):
        argv = [self.ferry] + list(args) + ["--client-config", self.lab["client_config"], "--json"]
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (rc=%d): %s %s" % (" ".join(argv), r.returncode,
                                                           r.stdout.decode(), r.stderr.decode()))
        return r

    def run(self, name, cmdline, settle_s):
        spec = {"name": name, "memory_mib": self.memory_mib, "vcpus": 1, "machine": "q35",
                "boot": {"type": "kernel", "kernel": self.lab["guest_image"], "cmdline": cmdline}}
        spec_path = os.path.join(self.workdir, name + ".json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        try:
            self.live.append((name, "host1"))
            vm = json.loads(self.fer("vm", "start", "--spec", spec_path, "--host", "host1").stdout)
            src_log = vm["console_log"]
            wait_ready(lambda: read_console_file(src_log), name + " (ferry src)")
            time.sleep(settle_s)
            guest_arg = "guest=" + name
            sampler = CpuSampler(self.agent_pids(), match=lambda argv: guest_arg in argv)
            sampler.start()
            t0 = time.time()
            try:
                r = self.fer("migrate", name, "--to", "host2", "--host", "host1")
            finally:
                t_ret = time.time()
                cpu_s, cpu_by = sampler.stop()
            mig = json.loads(r.stdout)
            if mig.get("state") != "completed":
                raise RuntimeError("ferry migration not completed: %s" % mig)
            self.live[-1] = (name, "host2")
            vms = json.loads(self.fer("vm", "list", "--host", "host2").stdout)["vms"]
            dvm = [v for v in vms if v["name"] == name]
            if not dvm or dvm[0].get("state") != "running":
                raise RuntimeError("ferry destination VM not running: %s" % vms)
            wall_ms = (t_ret - t0) * 1000.0
            dst_log = dvm[0]["console_log"]
            departed = os.path.join(self.hosts["host1"]["state_dir"], "departed", mig["id"],
                                    "console.log")
            deadline = time.time() + 10
            while not os.path.exists(departed) and time.time() < deadline:
                time.sleep(0.1)
            srcc = parse_console(read_console_file(departed))
            wait_hbs(lambda: read_console_file(dst_log), name + " (ferry dst)",
                     srcc["hbs"][-1][1] if srcc["hbs"] else None)
            dstc = parse_console(read_console_file(dst_log))
            bo, lseq, fseq, prog, rep = blackout(srcc, dstc)
            self.fer("vm", "stop", name, "--host", "host2", check=False, timeout=60)
            self.live.pop()
            total = mig.get("total_ms")
            return {
                "bytes": mig.get("bytes"),
                "total_ms": total,
                "throughput": mig["bytes"] / (total / 1000.0) if total else None,
                "wall_ms": wall_ms,
                "downtime_ms": mig.get("qemu_downtime_ms"),
                "blackout_ms": bo,
                "last_src_seq": lseq,
                "first_dst_seq": fseq,
                "progress_ms": prog,
                "replayed": rep,
                "sweep_errors": srcc["sweep_errors"] + dstc["sweep_errors"],
                "id": mig["id"],
                "cpu_s": cpu_s,
                "cpu_by": cpu_by,
            }
        except Exception:
            self.cleanup()
            raise

    def cleanup(self):
        for name, host in self.live:
            for h in ("host1", "host2"):
                self.fer("vm", "stop", name, "--host", h, check=False, timeout=60)
        self.live = []


# ---------------------------------------------------------------- report

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def rng(xs):
    xs = [x for x in xs if x is not None]
    return (min(xs), max(xs)) if xs else (None, None)


def fmt(v, d=0):
    if v is None:
        return "n/a"
    return ("%%.%df" % d) % v


def cell(xs, scale=1.0, d=0):
    xs = [x * scale for x in xs if x is not None]
    if not xs:
        return "n/a"
    lo, hi = rng(xs)
    if len(xs) == 1:
        return fmt(med(xs), d)
    return "%s (%s–%s)" % (fmt(med(xs), d), fmt(lo, d), fmt(hi, d))


def cpu_per_gb(r):
    if r.get("cpu_s") is None or not r.get("bytes"):
        return None
    return r["cpu_s"] / (r["bytes"] / 1e9)


def render(results, args, transports, tls_info=None):
    MB = 1e-6
    out = []
    out.append("Guest: %d MiB RAM, %d MiB filled, 1 vCPU, q35, TCG, heartbeat every %d ms; "
               "max-bandwidth 64 GiB/s, downtime-limit %d ms. %d round(s), every transport once per "
               "round in rotating order; cells are median (min–max). MB = 10^6 bytes, GB = 10^9 bytes."
               % (args.memory_mib, args.fill_mib, HB_MS, DOWNTIME_LIMIT_MS, args.rounds))
    if tls_info:
        out.append("")
        out.append("QEMU native TLS negotiated %s (GnuTLS defaults, ECDSA P-256 certificates, "
                   "verify-peer=on on both ends; seen in the ServerHello of a probe migration)."
                   % tls_info)
    out.append("")
    out.append("| guest | transport | throughput MB/s | guest blackout ms | CPU s per GB "
               "| until new progress ms | QEMU downtime ms | total ms | MB sent "
               "| wall: migrate → dst running ms |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for kind in results:
        for t in transports:
            rs = results[kind][t]
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, LABELS[t],
                cell([r["throughput"] for r in rs], MB),
                cell([r["blackout_ms"] for r in rs]),
                cell([cpu_per_gb(r) for r in rs], d=2),
                cell([r["progress_ms"] for r in rs]),
                cell([r["downtime_ms"] for r in rs]),
                cell([r["total_ms"] for r in rs]),
                cell([r["bytes"] for r in rs], MB),
                cell([r["wall_ms"] for r in rs])))
    if "plain-unix" in transports:
        out.append("")
        out.append("Relative to plain QEMU over a unix socket, per round (ratios and differences "
                   "are taken within a round, then median (min–max) over rounds):")
        out.append("")
        out.append("| guest | transport | throughput ratio | CPU per GB ratio "
                   "| guest blackout − plain ms | until new progress − plain ms |")
        out.append("|---|---|---|---|---|---|")
        for kind in results:
            base = results[kind]["plain-unix"]
            for t in transports:
                if t == "plain-unix":
                    continue
                tr, cr, bd, pd = [], [], [], []
                for p, f in zip(base, results[kind][t]):
                    if p["throughput"] and f["throughput"]:
                        tr.append(f["throughput"] / p["throughput"])
                    if cpu_per_gb(p) and cpu_per_gb(f) is not None:
                        cr.append(cpu_per_gb(f) / cpu_per_gb(p))
                    if p["blackout_ms"] is not None and f["blackout_ms"] is not None:
                        bd.append(f["blackout_ms"] - p["blackout_ms"])
                    if p["progress_ms"] is not None and f["progress_ms"] is not None:
                        pd.append(f["progress_ms"] - p["progress_ms"])
                out.append("| %s | %s | %s | %s | %s | %s |" % (kind, LABELS[t], cell(tr, d=2),
                                                              cell(cr, d=2), cell(bd), cell(pd)))
    secure = [t for t in SECURE if t in transports]
    if "ferry" in transports and secure:
        out.append("")
        out.append("Ferry against the best existing secure transport of the same round "
                   "(%s; best = highest throughput in that round):" % ", ".join(LABELS[t] for t in secure))
        out.append("")
        out.append("| guest | best secure per round | throughput Ferry/best | CPU per GB Ferry/best "
                   "| CPU per GB Ferry/QEMU TLS | guest blackout Ferry − best ms |")
        out.append("|---|---|---|---|---|---|")
        for kind in results:
            n = len(results[kind]["ferry"])
            tr, cr, ct, bd, names = [], [], [], [], []
            for i in range(n):
                f = results[kind]["ferry"][i]
                cands = [(results[kind][t][i]["throughput"] or 0, t) for t in secure
                         if i < len(results[kind][t])]
                if not cands:
                    continue
                best_t = max(cands)[1]
                b = results[kind][best_t][i]
                names.append(best_t)
                if b["throughput"] and f["throughput"]:
                    tr.append(f["throughput"] / b["throughput"])
                if cpu_per_gb(b) and cpu_per_gb(f) is not None:
                    cr.append(cpu_per_gb(f) / cpu_per_gb(b))
                if "qemu-tls" in secure and i < len(results[kind]["qemu-tls"]):
                    q = results[kind]["qemu-tls"][i]
                    if cpu_per_gb(q) and cpu_per_gb(f) is not None:
                        ct.append(cpu_per_gb(f) / cpu_per_gb(q))
                if b["blackout_ms"] is not None and f["blackout_ms"] is not None:
                    bd.append(f["blackout_ms"] - b["blackout_ms"])
            out.append("| %s | %s | %s | %s | %s | %s |" % (kind, ", ".join(names), cell(tr, d=2),
                                                          cell(cr, d=2), cell(ct, d=2), cell(bd)))
    out.append("")
    out.append("Per-run raw values (order = execution order within the round; CPU split "
               "by process name in seconds):")
    out.append("")
    out.append("| guest | round | transport | bytes | total ms | wall ms | QEMU downtime ms "
               "| blackout ms | until new progress ms | last src HB seq | first dst HB seq "
               "| HBs re-printed on dst | sweep errors | CPU s | CPU by process |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in results:
        for r in results[kind]["raw"]:
            by = ", ".join("%s %.2f" % (k, v) for k, v in sorted((r.get("cpu_by") or {}).items(),
                                                                  key=lambda kv: -kv[1]) if v >= 0.005)
            out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, r["round"], r["method"], r["bytes"], fmt(r["total_ms"]), fmt(r["wall_ms"]),
                fmt(r["downtime_ms"]), fmt(r["blackout_ms"]), fmt(r["progress_ms"]),
                r["last_src_seq"], r["first_dst_seq"], r["replayed"], r["sweep_errors"],
                fmt(r.get("cpu_s"), 2), by))
    return "\n".join(out)


def qemu_version():
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], stdout=subprocess.PIPE, timeout=10)
        return r.stdout.decode().splitlines()[0].strip()
    except Exception:
        return "unknown"


def write_md(table, args, argv):
    header = "\n".join([
        "Measured %s on a machine with nproc=%d, %s." % (
            datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            os.cpu_count() or 0, qemu_version()),
        "",
        "Command: `python3 scripts/bench.py %s`" % " ".join(argv),
        "",
    ])
    section = START_MARK + "\n" + header + "\n" + table + "\n" + END_MARK
    text = open(BENCH_MD).read() if os.path.exists(BENCH_MD) else ""
    if START_MARK in text and END_MARK in text:
        a = text.index(START_MARK)
        b = text.index(END_MARK) + len(END_MARK)
        text = text[:a] + section + text[b:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + section + "\n"
    with open(BENCH_MD, "w") as f:
        f.write(text)
    log("wrote %s" % BENCH_MD)


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--fill-mib", type=int, default=512)
    ap.add_argument("--dirty", type=int, default=64, help="pages/ms dirtied by the dirtying guest")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to let the guest run after READY before migrating")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256/128 MiB, 1 round")
    ap.add_argument("--guests", default="idle,dirtying", help="comma list of idle,dirtying")
    ap.add_argument("--transports", default=None,
                    help="comma list of %s (default: all that work here)" % ",".join(TRANSPORTS))
    ap.add_argument("--raw-json", default=None, help="also write every run's values to this file")
    ap.add_argument("--ferry", default=DEFAULT_FERRY)
    ap.add_argument("--write", action="store_true", help="update the spine section of BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    argv = sys.argv[1:]
    args = ap.parse_args()
    if args.quick:
        args.memory_mib, args.fill_mib, args.rounds = 256, 128, 1
    if args.transports:
        transports = [t.strip() for t in args.transports.split(",") if t.strip()]
        for t in transports:
            if t not in TRANSPORTS:
                sys.exit("unknown transport %r (known: %s)" % (t, ",".join(TRANSPORTS)))
    else:
        transports = list(TRANSPORTS)
        if not shutil.which("openssl"):
            log("openssl not found: skipping qemu-tls")
            transports.remove("qemu-tls")
        if not ((shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) and shutil.which("ssh")
                and shutil.which("ssh-keygen")):
            log("OpenSSH not found (apt-get install -y --no-install-recommends openssh-server "
                "openssh-client): skipping ssh")
            transports.remove("ssh")
        if not os.path.exists(args.ferry):
            log("ferry binary not found at %s (run `cargo build`): skipping ferry" % args.ferry)
            transports.remove("ferry")
    if "ferry" in transports and not os.path.exists(args.ferry):
        sys.exit("ferry binary not found at %s (run `cargo build`)" % args.ferry)

    # Under TCG, QEMU 7.2 drops writes made through stale TLB entries during
    # live migration (docs/known-issues.md); the guest's tlbflush=1 keeps that
    # defect out of the comparison, for every transport alike.
    on_kvm = os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")
    flush = "" if on_kvm else " tlbflush=1"
    kinds = []
    for g in args.guests.split(","):
        g = g.strip()
        if g == "idle":
            kinds.append(("idle-after-fill", "fill_mib=%d dirty=0 hb_ms=%d%s" % (args.fill_mib, HB_MS, flush)))
        elif g == "dirtying":
            kinds.append(("dirtying %d pages/ms" % args.dirty,
                          "fill_mib=%d dirty=%d hb_ms=%d%s" % (args.fill_mib, args.dirty, HB_MS, flush)))
        else:
            sys.exit("unknown guest kind %r" % g)

    workdir = tempfile.mkdtemp(prefix="ferry-bench-")
    labdir = os.path.join(workdir, "lab")
    procs = []
    lab_up = False
    ferry_runner = None
    ssh = None

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)

    try:
        log("transports: %s" % ",".join(transports))
        # Snapshot the binary: a concurrent `cargo build` must not swap the CLI
        # under agents that are already running (their protocols may differ).
        ferry_copy = os.path.join(workdir, "ferry")
        shutil.copy2(args.ferry, ferry_copy)
        args.ferry = ferry_copy
        # The lab also provides the guest image, so it is brought up even without ferry.
        log("lab up in %s" % labdir)
        r = subprocess.run([args.ferry, "lab", "up", "--dir", labdir, "--hosts", "2", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        lab_up = True
        if r.returncode != 0:
            raise RuntimeError("lab up failed: %s" % r.stderr.decode())
        lab = json.loads(r.stdout)
        image = os.path.join(lab["images_dir"], lab["guest_image"])
        x509_dir = tls_info = None
        if "qemu-tls" in transports:
            x509_dir = make_x509_dir(workdir)
            tls_info = probe_qemu_tls(workdir, x509_dir, procs)
            log("QEMU TLS probe: %s" % tls_info)
        if "ssh" in transports:
            ssh = SshServer(workdir)
            log("private sshd on 127.0.0.1:%d (pid %d)" % (ssh.port, ssh.proc.pid))
        plain = PlainRunner(workdir, image, args.memory_mib, procs, x509_dir, ssh)
        ferry_runner = FerryRunner(args.ferry, lab, workdir, args.memory_mib)

        results = {}
        for kind, cmdline in kinds:
            results[kind] = {t: [] for t in transports}
            results[kind]["raw"] = []
        n = len(transports)
        for rnd in range(1, args.rounds + 1):
            for ki, (kind, cmdline) in enumerate(kinds):
                shift = (rnd - 1 + ki) % n
                order = transports[shift:] + transports[:shift]
                for method in order:
                    name = "b%d%s%s" % (rnd, "i" if ki == 0 else "d", method.replace("-", ""))
                    log("round %d %s: %s" % (rnd, kind, method))
                    if method == "ferry":
                        res = ferry_runner.run(name, cmdline, args.settle)
                    else:
                        res = plain.run(name, cmdline, args.settle, method)
                    log("  bytes=%s total_ms=%s wall_ms=%.0f downtime=%s blackout=%s progress=%s "
                        "seq %s->%s cpu=%.2fs (%s s/GB)"
                        % (res["bytes"], res["total_ms"], res["wall_ms"], res["downtime_ms"],
                           res["blackout_ms"], res["progress_ms"], res["last_src_seq"],
                           res["first_dst_seq"], res["cpu_s"], fmt(cpu_per_gb(res), 2)))
                    results[kind][method].append(res)
                    raw = dict(res)
                    raw["round"], raw["method"] = rnd, method
                    results[kind]["raw"].append(raw)
        table = render(results, args, transports, tls_info)
        print(table)
        if args.raw_json:
            with open(args.raw_json, "w") as f:
                json.dump({"args": vars(args), "tls": tls_info, "results": results}, f, indent=1)
        if args.write:
            write_md(table, args, argv)
    finally:
        if ssh is not None:
            ssh.close()
        if ferry_runner is not None:
            try:
                ferry_runner.cleanup()
            except Exception as e:
                log("cleanup of Ferry VMs: %s" % e)
        for p in procs:
            kill_proc(p)
        if lab_up:
            subprocess.run([args.ferry, "lab", "down", "--dir", labdir], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
