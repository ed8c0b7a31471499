"""Constants and small helpers shared by the benchmark modules."""

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_FERRY = os.path.join(ROOT, "target", "debug", "ferry")
BENCH_MD = os.path.join(ROOT, "BENCHMARKS.md")
START_MARK = "<!-- bench:spine:start -->"
END_MARK = "<!-- bench:spine:end -->"
MAX_BW = 68719476736  # 64 GiB/s, what Ferry's agents set for max_bandwidth_mib_s = 0
DOWNTIME_LIMIT_MS = 300
HB_MS = 1
READY_TIMEOUT_S = 180
MIGRATE_TIMEOUT_S = 600


class NotConverged(Exception):
    """A migration still running when the convergence budget ran out; it was
    cancelled and the VM resumed on the source.  `info` holds what is known
    about it at the time (bytes sent so far, passes, QEMU's dirty rate)."""

    def __init__(self, info):
        super().__init__("did not converge")
        self.info = info


def now_ms():
    return int(time.time() * 1000)


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


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


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tcp_listening(port, pid=None):
    """Whether something listens on TCP port in the network namespace of
    process pid (None: this process's), as /proc/PID/net shows it."""
    base = "/proc/%d/net" % pid if pid is not None else "/proc/net"
    for fn in (base + "/tcp", base + "/tcp6"):
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
    """Waits for a listener on port in proc's network namespace (it may run
    in a lab host's namespace, through `ip netns exec`, which execs in place
    and keeps the pid)."""
    deadline = time.time() + timeout
    while not tcp_listening(port, proc.pid if proc is not None else None):
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


def qemu_version():
    try:
        r = subprocess.run(["qemu-system-x86_64", "--version"], stdout=subprocess.PIPE, timeout=10)
        return r.stdout.decode().splitlines()[0].strip()
    except Exception:
        return "unknown"
