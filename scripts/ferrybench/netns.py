"""Benchmarking between namespaced lab hosts (`bench.py --netns`): where each
side of a QEMU-to-QEMU migration runs, the link profile (`ferry lab link`),
the link's own TCP capacity, and the table against the link rate.

With --netns the source side (source QEMU, ssh client, stunnel client) runs
in host1's namespace and the destination side (destination QEMU, sshd,
stunnel server) in host2's, and they meet at host2's migration address, so
every byte crosses the lab's migration bridge, as Ferry's own do."""

import json
import os
import subprocess

from .common import kill_proc, log
from .report import cell, cpu_per_gb, ok
from .transports import LIBVIRT, POSTCOPY, label
from .plot import text_bars

# What cannot run between two hosts' namespaces, and why.
UNSUPPORTED = {
    "plain-unix": "a unix socket is a file, it does not cross a network",
    "libvirt-tcp": "the libvirt lab keeps its hosts on loopback (lab up --backend libvirt)",
    "libvirt-tls": "the libvirt lab keeps its hosts on loopback (lab up --backend libvirt)",
    "ferry-libvirt": "the libvirt lab keeps its hosts on loopback (lab up --backend libvirt)",
}
assert all(t in UNSUPPORTED for t in LIBVIRT)

PROFILES = {"1gbit": 1e9, "10gbit": 10e9, "unshaped": None}


class Placement:
    """Network namespaces of the two sides (None: this process's own) and
    the address the destination side listens on."""

    def __init__(self, src_ns=None, dst_ns=None, dst_addr="127.0.0.1"):
        self.src_ns, self.dst_ns, self.dst_addr = src_ns, dst_ns, dst_addr

    def src(self, argv):
        return wrap(self.src_ns, argv)

    def dst(self, argv):
        return wrap(self.dst_ns, argv)

    def describe(self):
        if self.src_ns is None:
            return "loopback (127.0.0.1)"
        return "source side in %s, destination side in %s at %s" % (
            self.src_ns, self.dst_ns, self.dst_addr)


def wrap(ns, argv):
    return ["ip", "netns", "exec", ns] + list(argv) if ns else list(argv)


def lab_net(lab, labdir):
    """The lab's networks: lab.json's `net`, else DIR/netns.json."""
    net = lab.get("net")
    if net is None:
        path = os.path.join(labdir, "netns.json")
        if os.path.exists(path):
            with open(path) as f:
                net = json.load(f)
    if net is None:
        raise RuntimeError("the lab in %s has no network namespaces (lab up --netns failed "
                           "back to loopback?)" % labdir)
    return net


def placement(lab, labdir, src="host1", dst="host2"):
    hosts = {h["name"]: h for h in lab_net(lab, labdir)["hosts"]}
    for h in (src, dst):
        if h not in hosts:
            raise RuntimeError("host %s is not in the lab's networks" % h)
    return Placement(hosts[src]["netns"], hosts[dst]["netns"], hosts[dst]["migration"])


def mig_tx_bytes(place):
    """Bytes the source host has sent on its migration interface so far: a
    run's difference shows that its migration crossed the migration link."""
    r = subprocess.run(place.src(["cat", "/sys/class/net/mig/statistics/tx_bytes"]),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    if r.returncode != 0:
        raise RuntimeError("cannot read %s's mig counters: %s" % (place.src_ns,
                                                                 r.stderr.decode().strip()))
    return int(r.stdout)


def unsupported(transports):
    """(kept transports, log lines for the skipped ones)."""
    kept = [t for t in transports if t not in UNSUPPORTED]
    lines = ["--netns: not running %s: %s" % (t, UNSUPPORTED[t])
             for t in transports if t in UNSUPPORTED]
    return kept, lines


def lab_link(ferry, labdir, host, *change):
    """`ferry lab link`; returns what it printed."""
    r = subprocess.run([ferry, "lab", "link", "--dir", labdir, host] + list(change),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("ferry lab link %s %s failed: %s" % (host, " ".join(change),
                                                              r.stderr.decode().strip()))
    return r.stdout.decode().strip()


SINK = ("import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print('ready', flush=True)\n"
        "c,_=s.accept(); n=0\n"
        "while True:\n"
        "    b=c.recv(1<<20)\n"
        "    if not b: break\n"
        "    n+=len(b)\n"
        "print(n, flush=True)\n")

SOURCE = ("import socket,sys,time\n"
          "c=socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf=bytes(1<<20)\n"
          "t0=time.time(); n=0\n"
          "while time.time()-t0 < float(sys.argv[3]):\n"
          "    c.sendall(buf); n+=len(buf)\n"
          "c.shutdown(socket.SHUT_WR); c.recv(1); print(n, time.time()-t0, flush=True)\n")


def link_capacity(place, seconds=3.0, port=5999):
    """Bytes per second one TCP stream carries from the source side to the
    destination side (a Python sender and sink, so a floor of what the link
    can do, not a NIC's line rate)."""
    sink = subprocess.Popen(place.dst(["python3", "-c", SINK, place.dst_addr, str(port)]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        if sink.stdout.readline().strip() != b"ready":
            raise RuntimeError("link probe sink did not start: %s" % sink.stderr.read().decode())
        r = subprocess.run(place.src(["python3", "-c", SOURCE, place.dst_addr, str(port),
                                      str(seconds)]),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=seconds + 60)
        if r.returncode != 0:
            raise RuntimeError("link probe sender failed: %s" % r.stderr.decode())
        _, elapsed = r.stdout.split()
        received = int(sink.stdout.readline())
        return received / float(elapsed)
    finally:
        kill_proc(sink)


def baseline(t):
    """The plain QEMU transport t is compared with: post-copy with plain
    post-copy (a guest that needs post-copy never converges over plain TCP,
    so there is no plain TCP figure to compare with), the rest with TCP."""
    return "plain-postcopy" if t in POSTCOPY else "plain-tcp"


def render_link(results, meta):
    """Per transport: throughput as a fraction of the link rate and as a
    ratio to its plain QEMU baseline of the same round, CPU s per GB,
    blackout and blackout minus the baseline's."""
    link = meta["link"]
    rate = link.get("rate_bps")
    cap = link.get("capacity_Bps")
    out = ["", "Link profile **%s** (%s): %s. One TCP stream of a Python sender measured %s "
           "Gbit/s on this link before the batch." % (
               link["profile"], link["placement"],
               "`ferry lab link host1 --rate %s` (tbf on both ends of host1's migration veth)"
               % link["profile"] if rate else "no shaping (veth through the lab's bridge)",
               "%.2f" % (cap * 8e-9) if cap else "n/a")]
    denom = rate if rate else (cap * 8 if cap else None)
    what = "the link rate" if rate else "the measured single-stream TCP capacity"
    out.append("")
    out.append("Throughput against %s and against plain QEMU TCP (post-copy: against plain "
               "QEMU post-copy; ratios and differences within a round, then median (min–max) "
               "over rounds):" % what)
    out.append("")
    out.append("| guest | transport | fraction of link | throughput / plain "
               "| CPU s per GB | guest blackout ms | blackout − plain ms "
               "| bytes out of host1's mig / bytes migrated |")
    out.append("|---|---|---|---|---|---|---|---|")
    for kind in results:
        for t in [t for t in results[kind] if t != "raw"]:
            rs = results[kind][t]
            is_base = t == baseline(t)
            base = results[kind].get(baseline(t))
            frac = [r["throughput"] * 8 / denom for r in rs if ok(r) and r["throughput"] and denom]
            tr, bd = [], []
            if base is not None and not is_base:
                for p, f in zip(base, rs):
                    if ok(p) and ok(f) and p["throughput"] and f["throughput"]:
                        tr.append(f["throughput"] / p["throughput"])
                    if ok(p) and ok(f) and p["blackout_ms"] is not None \
                            and f["blackout_ms"] is not None:
                        bd.append(f["blackout_ms"] - p["blackout_ms"])
            sent = [r["link_bytes"] / r["bytes"] for r in rs
                    if ok(r) and r.get("link_bytes") and r.get("bytes")]
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, label(t, meta["streams"], True), cell(frac, d=3),
                cell(tr, d=2) if not is_base else "1",
                cell([cpu_per_gb(r) for r in rs if ok(r)], d=2),
                cell([r["blackout_ms"] for r in rs if ok(r)]),
                cell(bd) if not is_base else "0", cell(sent, d=2)))
    chart = [(kind + ", " + label(t, meta["streams"], True),
              [r["throughput"] * 8 / denom for r in results[kind][t]
               if ok(r) and r["throughput"] and denom])
             for kind in results for t in results[kind] if t != "raw"]
    if denom and chart:
        out += ["", "Throughput as a fraction of %s (bar: median; `·`: to the round's "
                "maximum; the whole width is 1.0):" % what, "", "```",
                text_bars(chart, 1.0), "```"]
    return "\n".join(out)


ROLES = {"qemu-system-x86_64": "source QEMU", "qemu-system-x86_64 (dst)": "destination QEMU",
         "agent host1": "source agent", "agent host2": "destination agent",
         "stunnel4": "both stunnels", "sshd: root": "sshd session"}


def role(name):
    """A display name: process, or process/thread."""
    proc, _, thread = name.partition("/")
    return ROLES.get(proc, proc) + ("/" + thread if thread else "")


def top_shares(rs, key, n):
    """[(name, median share of one core)] of the n busiest entries of r[key]
    ({name: CPU seconds}) over runs rs, per second of wall time."""
    shares = {}
    for r in rs:
        if ok(r) and r.get(key) and r.get("wall_ms"):
            for name, s in r[key].items():
                shares.setdefault(name, []).append(s / (r["wall_ms"] / 1000.0))
    meds = sorted(((sorted(v)[len(v) // 2], name) for name, v in shares.items()), reverse=True)
    return [(role(name), share) for share, name in meds[:n]]


def render_busiest(results, streams):
    """The two busiest processes and the busiest thread, which name the
    bottleneck: CPU seconds over the wall time the sampler ran (migrate
    command to destination running), so 1.00 is one core saturated."""
    out = ["", "The two busiest processes and the busiest thread per migration (median CPU "
           "seconds over the wall time from the migrate command to the destination running; "
           "1.00 = one core saturated; the machine has %d):" % (os.cpu_count() or 0), "",
           "| guest | transport | busiest process | second | busiest thread |",
           "|---|---|---|---|---|"]
    for kind in results:
        for t in [t for t in results[kind] if t != "raw"]:
            procs = top_shares(results[kind][t], "cpu_by", 2)
            thread = top_shares(results[kind][t], "cpu_threads", 1)
            cells = ["%s %.2f" % (n, s) for n, s in procs + thread]
            cells = (cells[:len(procs)] + ["n/a"] * (2 - len(procs))
                     + (cells[len(procs):] or ["n/a"]))
            out.append("| %s | %s | %s |" % (kind, label(t, streams, True), " | ".join(cells)))
    return "\n".join(out)
