"""The test guest's serial output (ferry-guest.elf): READY, `HB seq=N`
heartbeats, SWEEP results, and the guest-observed blackout they give."""

import socket
import threading
import time

from .common import READY_TIMEOUT_S, now_ms


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


def max_gap(dst, window_ms=2000):
    """Longest gap between consecutive destination heartbeats in the first
    window_ms after the first one (post-copy stalls the guest on page faults)."""
    hbs = dst["hbs"]
    if len(hbs) < 2:
        return None
    end = hbs[0][0] + window_ms
    gaps = [b[0] - a[0] for a, b in zip(hbs, hbs[1:]) if b[0] <= end]
    return max(gaps) if gaps else None


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


class SerialReader(threading.Thread):
    """Reads a QEMU serial unix socket, timestamping each line on arrival."""

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


def migration_result(nbytes, total_ms, wall_ms, downtime_ms, srcc, dstc, cpu_s, cpu_by, **extra):
    """One converged migration's figures, the same for every transport:
    throughput from bytes / total time, blackout and continuity from the two
    parsed consoles, CPU from the sampler; `extra` adds transport-specific keys."""
    bo, lseq, fseq, prog, rep = blackout(srcc, dstc)
    res = {
        "bytes": nbytes,
        "total_ms": total_ms,
        "throughput": nbytes / (total_ms / 1000.0) if total_ms and nbytes is not None else None,
        "wall_ms": wall_ms,
        "downtime_ms": downtime_ms,
        "blackout_ms": bo,
        "last_src_seq": lseq,
        "first_dst_seq": fseq,
        "progress_ms": prog,
        "replayed": rep,
        "sweep_errors": srcc["sweep_errors"] + dstc["sweep_errors"],
        "cpu_s": cpu_s,
        "cpu_by": cpu_by,
        "converged": True,
        "dst_max_hb_gap_ms": max_gap(dstc),
    }
    res.update(extra)
    return res
