#!/usr/bin/env python3
"""Ferry spine benchmark: one live migration through Ferry vs. the same
migration with plain QEMU (unix socket, no TLS, no agents), on the same machine.

For each guest kind (idle-after-fill, dirtying) and each round it runs one
plain-QEMU migration and one Ferry migration, alternating which goes first per
round, and reports medians and min-max of:

  * throughput   bytes / total migration time
                 plain: ram.transferred / total-time from QMP query-migrate
                 ferry: bytes / total_ms from the migration record
  * wall         wall-clock from issuing the migrate command to the destination
                 running (plain: migrate QMP -> `cont` returned;
                 ferry: `ferry migrate` start -> command returned, dest VM listed running)
  * blackout     guest-observed: first HB line on the destination console minus
                 the last HB line on the source console (ms)
  * qemu downtime as reported by QEMU (plain: query-migrate downtime;
                 ferry: qemu_downtime_ms)

Python 3 stdlib only.  Usage:
    python3 scripts/bench.py --rounds 3 --write
    python3 scripts/bench.py --quick
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
    def __init__(self, workdir, image, memory_mib, procs):
        self.workdir = workdir
        self.image = image
        self.memory_mib = memory_mib
        self.procs = procs  # shared list for global cleanup

    def launch(self, tag, cmdline, incoming):
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

    def run(self, name, cmdline, settle_s):
        src = dst = None
        try:
            src = self.launch(name + "-src", cmdline, incoming=False)
            sp, sq, sr = src
            wait_ready(lambda: sr.snapshot(), name + " (plain src)")
            time.sleep(settle_s)
            dst = self.launch(name + "-dst", cmdline, incoming=True)
            dp, dq, dr = dst
            sock = os.path.join(self.workdir, name + ".mig")
            if os.path.exists(sock):
                os.unlink(sock)
            dq.cmd("migrate-incoming", {"uri": "unix:" + sock})
            deadline = time.time() + 10
            while not os.path.exists(sock):
                if time.time() > deadline:
                    raise RuntimeError("incoming migration socket did not appear")
                time.sleep(0.01)
            sq.cmd("migrate-set-parameters", {"max-bandwidth": MAX_BW,
                                              "downtime-limit": DOWNTIME_LIMIT_MS})
            t0 = time.time()
            sq.cmd("migrate", {"uri": "unix:" + sock})
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
            }
        finally:
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


# ---------------------------------------------------------------- Ferry

class FerryRunner:
    def __init__(self, ferry, lab, workdir, memory_mib):
        self.ferry = ferry
        self.lab = lab
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.hosts = {h["name"]: h for h in lab["hosts"]}
        self.live = []  # (vm, host) to stop on failure

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
            t0 = time.time()
            r = self.fer("migrate", name, "--to", "host2", "--host", "host1")
            t_ret = time.time()
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


def render(results, args):
    MiB = 1.0 / (1024 * 1024)
    out = []
    out.append("Guest: %d MiB RAM, %d MiB filled, 1 vCPU, q35, TCG, heartbeat every %d ms. "
               "%d round(s); cells are median (min–max)." % (args.memory_mib, args.fill_mib,
                                                            HB_MS, args.rounds))
    out.append("")
    out.append("| guest | method | throughput MiB/s | total ms | MiB sent | wall: migrate → dst running ms "
               "| QEMU downtime ms | guest blackout ms | until new progress ms |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for kind in results:
        for method in ("plain", "ferry"):
            rs = results[kind][method]
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, "plain QEMU (unix socket)" if method == "plain" else "Ferry (mTLS, agents)",
                cell([r["throughput"] for r in rs], MiB),
                cell([r["total_ms"] for r in rs]),
                cell([r["bytes"] for r in rs], MiB),
                cell([r["wall_ms"] for r in rs]),
                cell([r["downtime_ms"] for r in rs]),
                cell([r["blackout_ms"] for r in rs]),
                cell([r["progress_ms"] for r in rs])))
    out.append("")
    out.append("Ferry relative to plain QEMU, per round (ratios and differences are taken within a "
               "round, then median (min–max) over rounds):")
    out.append("")
    out.append("| guest | throughput ratio Ferry/plain | wall ratio Ferry/plain "
               "| guest blackout Ferry − plain ms | until new progress Ferry − plain ms "
               "| QEMU downtime Ferry − plain ms |")
    out.append("|---|---|---|---|---|---|")
    for kind in results:
        pl, fe = results[kind]["plain"], results[kind]["ferry"]
        tr, wr, bd, dd, pd = [], [], [], [], []
        for p, f in zip(pl, fe):
            if p["throughput"] and f["throughput"]:
                tr.append(f["throughput"] / p["throughput"])
            if p["wall_ms"] and f["wall_ms"]:
                wr.append(f["wall_ms"] / p["wall_ms"])
            if p["blackout_ms"] is not None and f["blackout_ms"] is not None:
                bd.append(f["blackout_ms"] - p["blackout_ms"])
            if p["progress_ms"] is not None and f["progress_ms"] is not None:
                pd.append(f["progress_ms"] - p["progress_ms"])
            if p["downtime_ms"] is not None and f["downtime_ms"] is not None:
                dd.append(f["downtime_ms"] - p["downtime_ms"])
        out.append("| %s | %s | %s | %s | %s | %s |" % (kind, cell(tr, d=2), cell(wr, d=2),
                                                        cell(bd), cell(pd), cell(dd)))
    out.append("")
    out.append("Per-run raw values (order = execution order within the round):")
    out.append("")
    out.append("| guest | round | method | bytes | total ms | wall ms | QEMU downtime ms "
               "| blackout ms | until new progress ms | last src HB seq | first dst HB seq "
               "| HBs re-printed on dst | sweep errors |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in results:
        for r in results[kind]["raw"]:
            out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, r["round"], r["method"], r["bytes"], fmt(r["total_ms"]), fmt(r["wall_ms"]),
                fmt(r["downtime_ms"]), fmt(r["blackout_ms"]), fmt(r["progress_ms"]),
                r["last_src_seq"], r["first_dst_seq"], r["replayed"], r["sweep_errors"]))
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
    ap.add_argument("--memory-mib", type=int, default=1536)
    ap.add_argument("--fill-mib", type=int, default=1024)
    ap.add_argument("--dirty", type=int, default=64, help="pages/ms dirtied by the dirtying guest")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to let the guest run after READY before migrating")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256/128 MiB, 1 round")
    ap.add_argument("--guests", default="idle,dirtying", help="comma list of idle,dirtying")
    ap.add_argument("--ferry", default=DEFAULT_FERRY)
    ap.add_argument("--write", action="store_true", help="update the spine section of BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    argv = sys.argv[1:]
    args = ap.parse_args()
    if args.quick:
        args.memory_mib, args.fill_mib, args.rounds = 256, 128, 1
    if not os.path.exists(args.ferry):
        sys.exit("ferry binary not found at %s (run `cargo build`)" % args.ferry)

    kinds = []
    for g in args.guests.split(","):
        g = g.strip()
        if g == "idle":
            kinds.append(("idle-after-fill", "fill_mib=%d dirty=0 hb_ms=%d" % (args.fill_mib, HB_MS)))
        elif g == "dirtying":
            kinds.append(("dirtying %d pages/ms" % args.dirty,
                          "fill_mib=%d dirty=%d hb_ms=%d" % (args.fill_mib, args.dirty, HB_MS)))
        else:
            sys.exit("unknown guest kind %r" % g)

    workdir = tempfile.mkdtemp(prefix="ferry-bench-")
    labdir = os.path.join(workdir, "lab")
    procs = []
    lab_up = False
    ferry_runner = None

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_signal)

    try:
        log("lab up in %s" % labdir)
        r = subprocess.run([args.ferry, "lab", "up", "--dir", labdir, "--hosts", "2", "--json"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        lab_up = True
        if r.returncode != 0:
            raise RuntimeError("lab up failed: %s" % r.stderr.decode())
        lab = json.loads(r.stdout)
        image = os.path.join(lab["images_dir"], lab["guest_image"])
        plain = PlainRunner(workdir, image, args.memory_mib, procs)
        ferry_runner = FerryRunner(args.ferry, lab, workdir, args.memory_mib)

        results = {}
        for kind, cmdline in kinds:
            results[kind] = {"plain": [], "ferry": [], "raw": []}
        for rnd in range(1, args.rounds + 1):
            for ki, (kind, cmdline) in enumerate(kinds):
                order = ("plain", "ferry") if (rnd + ki) % 2 == 1 else ("ferry", "plain")
                for method in order:
                    name = "b%d%s%s" % (rnd, "i" if ki == 0 else "d", method[0])
                    log("round %d %s: %s" % (rnd, kind, method))
                    if method == "plain":
                        res = plain.run(name, cmdline, args.settle)
                    else:
                        res = ferry_runner.run(name, cmdline, args.settle)
                    log("  bytes=%s total_ms=%s wall_ms=%.0f downtime=%s blackout=%s progress=%s seq %s->%s"
                        % (res["bytes"], res["total_ms"], res["wall_ms"], res["downtime_ms"],
                           res["blackout_ms"], res["progress_ms"], res["last_src_seq"],
                           res["first_dst_seq"]))
                    results[kind][method].append(res)
                    raw = dict(res)
                    raw["round"], raw["method"] = rnd, method
                    results[kind]["raw"].append(raw)
        table = render(results, args)
        print(table)
        if args.write:
            write_md(table, args, argv)
    finally:
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
