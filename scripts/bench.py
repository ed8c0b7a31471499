#!/usr/bin/env python3
"""Ferry benchmark: the same live migration of the same test guest through
plain QEMU (unix socket, loopback TCP, multifd, post-copy), QEMU's native TLS
(tls-creds-x509, mutual certificates; one channel and multifd), an SSH tunnel
(aes128-gcm) and Ferry (mTLS, agents; one stream, multifd streams,
post-copy), interleaved on the same machine.

For each guest kind (idle-after-fill, dirtying, fast-dirtying) and each round
it runs every selected transport once, in an order that rotates per round,
and reports medians and min-max of:

  * throughput   bytes / total migration time
                 QEMU transports: ram.transferred / total-time from query-migrate
                 ferry: bytes / qemu_total_ms from the source's migration record
                 (the source QEMU's own total-time, the same clock; until
                 issue 15's rerun it was the record's end-to-end total_ms,
                 which also holds setup, the destination QEMU's launch, the
                 gate and the Receipt: kept as record_total_ms in --raw-json)
  * wall         wall-clock from issuing the migrate command to the destination
                 running (QEMU transports: migrate QMP -> `cont` returned, or for
                 post-copy the destination seen running;
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
                 inside the migration).  Of the agents' CPU, their console
                 logging threads (`ferry-console`) are also shown apart, since
                 the other transports' consoles are read by this script,
                 uncounted.

A migration not completed --converge-s seconds after the migrate command is
cancelled and reported as "did not converge".  Post-copy transports run only
on the fast-dirtying guest.

Python 3 stdlib only (plus openssl for qemu-tls and OpenSSH for ssh); the
modules are in scripts/ferrybench/.  Usage:
    python3 scripts/bench.py --rounds 3 --write --raw-json /tmp/bench.json --plot /tmp/bench.svg
    python3 scripts/bench.py --quick
    python3 scripts/bench.py --transports plain-unix,qemu-tls,ferry --guests idle
    python3 scripts/bench.py --from-json /tmp/bench.json --plot /tmp/bench.svg
    python3 scripts/bench.py --netns --link 1gbit --transports plain-tcp,qemu-tls,ssh,ferry
    python3 scripts/bench.py --netns --link 1gbit --guests dirtying,fast --dirty 16 \\
        --transports plain-tcp,plain-postcopy,ferry,ferry-postcopy

--netns runs every transport between the namespaced lab hosts host1 and
host2 over their migration network (ferrybench/netns.py); --link shapes
host1's migration link for the batch (`ferry lab link`).
"""

import sys

sys.dont_write_bytecode = True  # no __pycache__ in the work tree

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

from ferrybench import ceilings  # noqa: E402
from ferrybench.common import DEFAULT_FERRY, HB_MS, kill_proc, log, qemu_version  # noqa: E402
from ferrybench.ferry import FerryRunner, ferry_help  # noqa: E402
from ferrybench.libvirt import LibvirtRunner  # noqa: E402
from ferrybench import netns  # noqa: E402
from ferrybench.plain import PlainRunner  # noqa: E402
from ferrybench.plot import svg_chart  # noqa: E402
from ferrybench.qemutls import make_x509_dir, probe_qemu_tls  # noqa: E402
from ferrybench.report import cpu_per_gb, fmt, render, write_md  # noqa: E402
from ferrybench.ssh import SshServer  # noqa: E402
from ferrybench.stunnel import stunnel_binary  # noqa: E402
from ferrybench.transports import (FERRY, GUESTS, LIBVIRT, TLS, TRANSPORTS, X509,  # noqa: E402
                                   label, runs_on)

FAST_DIRTY = 256  # pages/ms of the fast-dirtying guest: ~1 GB/s (see BENCHMARKS.md)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-mib", type=int, default=1024)
    ap.add_argument("--fill-mib", type=int, default=512)
    ap.add_argument("--dirty", type=int, default=64, help="pages/ms dirtied by the dirtying guest")
    ap.add_argument("--fast-dirty", type=int, default=FAST_DIRTY,
                    help="pages/ms dirtied by the fast-dirtying guest (default %d)" % FAST_DIRTY)
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds to let the guest run after READY before migrating")
    ap.add_argument("--quick", action="store_true", help="smoke run: 256/128 MiB, 1 round")
    ap.add_argument("--guests", default=",".join(GUESTS), help="comma list of %s" % ",".join(GUESTS))
    ap.add_argument("--transports", default=None,
                    help="comma list of %s (default: all that work here but the libvirt ones, "
                         "which run a lab of their own)" % ",".join(TRANSPORTS))
    ap.add_argument("--streams", type=int, default=4,
                    help="multifd channels for plain-multifd, qemu-tls-multifd and ferry-multi "
                         "(ferry-multi: --streams N+1, one more for the main stream); 1..7")
    ap.add_argument("--converge-s", type=float, default=20.0,
                    help="cancel a migration not completed this many seconds after the migrate "
                         "command and report it as did not converge (0 = no limit)")
    ap.add_argument("--raw-json", default=None, help="also write every run's values to this file")
    ap.add_argument("--plot", default=None, help="write an SVG chart to this file")
    ap.add_argument("--from-json", default=None,
                    help="run nothing: print the tables (and --plot, --write) from a --raw-json file")
    ap.add_argument("--ferry", default=DEFAULT_FERRY)
    ap.add_argument("--write", action="store_true", help="update the spine section of BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--netns", action="store_true",
                    help="run every transport between two namespaced lab hosts over their "
                         "migration network (needs root)")
    ap.add_argument("--link", default=None, choices=sorted(netns.PROFILES),
                    help="with --netns: the link profile of host1's migration link")
    args = ap.parse_args()
    if args.link and not args.netns:
        sys.exit("--link shapes a namespaced lab's migration link: add --netns")
    if args.netns and not args.from_json and os.geteuid() != 0:
        sys.exit("--netns needs root (the lab creates network namespaces)")
    if args.quick:
        args.memory_mib, args.fill_mib, args.rounds = 256, 128, 1
    if not 1 <= args.streams <= 7:
        sys.exit("--streams must be 1..7 (Ferry carries at most 8 streams)")
    return args


def select_transports(args):
    if args.transports:
        transports = [t.strip() for t in args.transports.split(",") if t.strip()]
        for t in transports:
            if t not in TRANSPORTS:
                sys.exit("unknown transport %r (known: %s)" % (t, ",".join(TRANSPORTS)))
    else:
        transports = [t for t in TRANSPORTS if t not in LIBVIRT]
        if not shutil.which("openssl"):
            log("openssl not found: skipping qemu-tls, qemu-tls-multifd, stunnel")
            transports = [t for t in transports if t not in X509]
        if "stunnel" in transports and not stunnel_binary():
            log("stunnel not found (apt-get install -y --no-install-recommends stunnel4): skipping stunnel")
            transports.remove("stunnel")
        if not ((shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) and shutil.which("ssh")
                and shutil.which("ssh-keygen")):
            log("OpenSSH not found (apt-get install -y --no-install-recommends openssh-server "
                "openssh-client): skipping ssh")
            transports.remove("ssh")
        if not os.path.exists(args.ferry):
            log("ferry binary not found at %s (run `cargo build`): skipping ferry" % args.ferry)
            transports = [t for t in transports if t not in FERRY]
    if any(t in LIBVIRT for t in transports) and not (shutil.which("virsh") and
                                                      (shutil.which("libvirtd") or
                                                       os.path.exists("/usr/sbin/libvirtd"))):
        sys.exit("libvirt transports need libvirtd and virsh (scripts/deps.sh installs them)")
    if any(t in FERRY + LIBVIRT for t in transports) and not os.path.exists(args.ferry):
        sys.exit("ferry binary not found at %s (run `cargo build`)" % args.ferry)
    if args.netns:
        transports, skipped = netns.unsupported(transports)
        for line in skipped:
            log(line)
        if not transports:
            sys.exit("nothing to run between namespaced hosts")
    return transports


def guest_kinds(args):
    """[(key, label, cmdline)] of the selected guests."""
    # Under TCG, QEMU 7.2 drops writes made through stale TLB entries during
    # live migration (docs/known-issues.md); the guest's tlbflush=1 keeps that
    # defect out of the comparison, for every transport and guest alike.
    on_kvm = os.path.exists("/sys/module/kvm_intel") or os.path.exists("/sys/module/kvm_amd")
    flush = "" if on_kvm else " tlbflush=1"
    kinds = []
    for g in args.guests.split(","):
        g = g.strip()
        if g == "idle":
            kinds.append((g, "idle-after-fill", "fill_mib=%d dirty=0 hb_ms=%d%s" % (args.fill_mib, HB_MS, flush)))
        elif g == "dirtying":
            kinds.append((g, "dirtying %d pages/ms" % args.dirty,
                          "fill_mib=%d dirty=%d hb_ms=%d%s" % (args.fill_mib, args.dirty, HB_MS, flush)))
        elif g == "fast":
            kinds.append((g, "fast-dirtying %d pages/ms" % args.fast_dirty,
                          "fill_mib=%d dirty=%d hb_ms=%d%s" % (args.fill_mib, args.fast_dirty, HB_MS, flush)))
        else:
            sys.exit("unknown guest kind %r (known: %s)" % (g, ",".join(GUESTS)))
    return kinds


def failed_result(e):
    r = {k: None for k in ("bytes", "total_ms", "throughput", "wall_ms", "downtime_ms",
                           "blackout_ms", "last_src_seq", "first_dst_seq", "progress_ms",
                           "replayed", "sweep_errors", "cpu_s", "cpu_by")}
    r.update({"converged": None, "error": str(e) or type(e).__name__})
    return r


def describe(res):
    if res.get("error"):
        return "FAILED: %s" % res["error"]
    if res.get("converged") is False:
        return "did not converge: cancelled after %s ms, %s bytes sent, cpu=%.2fs" % (
            fmt(res.get("nc_ms")), res.get("nc_bytes"), res.get("cpu_s") or 0)
    return ("bytes=%s total_ms=%s wall_ms=%.0f downtime=%s blackout=%s progress=%s "
            "seq %s->%s cpu=%.2fs (%s s/GB)"
            % (res["bytes"], res["total_ms"], res["wall_ms"], res["downtime_ms"],
               res["blackout_ms"], res["progress_ms"], res["last_src_seq"],
               res["first_dst_seq"], res["cpu_s"], fmt(cpu_per_gb(res), 2)))


def output(results, meta, machine, argv, args):
    """Print the tables; write --plot and, with --write, BENCHMARKS.md."""
    table = render(results, meta)
    if meta.get("link"):
        table += "\n" + netns.render_link(results, meta) + "\n" + netns.render_busiest(results, meta["streams"])
    rss = meta.get("agent_rss_mib") or {}
    if rss:
        table += "\n\nAgents' peak resident memory (VmHWM) over the whole batch: %s." % ", ".join(
            "%s %.1f MiB" % (h, m) for h, m in sorted(rss.items()))
    print(table)
    if args.plot:
        title = "%s, nproc=%s: %d MiB guest, %d MiB filled, TCG, %d round(s)" % (
            machine["measured"], machine["nproc"], meta["memory_mib"], meta["fill_mib"], meta["rounds"])
        with open(args.plot, "w") as f:
            f.write(svg_chart(results, meta["converge_s"], title, lambda t: label(t, meta["streams"], bool(meta.get("link")))))
        log("wrote %s" % args.plot)
    if args.write:
        note = ("Plot (SVG, not committed): add `--plot FILE` to the command above, or redraw it "
                "from the run's `--raw-json` file with "
                "`python3 scripts/bench.py --from-json RAW.json --plot FILE`.")
        profile = (meta.get("link") or {}).get("profile")
        marks = ("<!-- bench:netns-%s:start -->" % profile,
                 "<!-- bench:netns-%s:end -->" % profile) if profile else None
        write_md(table, machine, argv, note, *([marks] if marks else []))


def from_json(args):
    with open(args.from_json) as f:
        doc = json.load(f)
    a = doc.get("args", {})
    meta = doc.get("meta") or {"memory_mib": a.get("memory_mib"), "fill_mib": a.get("fill_mib"),
                               "rounds": a.get("rounds"), "streams": a.get("streams", 4),
                               "converge_s": a.get("converge_s", 0) or 0, "tls_info": doc.get("tls")}
    machine = doc.get("machine") or {"measured": "(unknown)", "nproc": 0, "qemu": "unknown"}
    argv = doc.get("argv") or ["(unknown)"]
    output(doc["results"], meta, machine, argv, args)


def main():
    argv = sys.argv[1:]
    args = parse_args()
    if args.from_json:
        return from_json(args)
    transports = select_transports(args)
    kinds = guest_kinds(args)

    workdir = tempfile.mkdtemp(prefix="ferry-bench-")
    labdir = os.path.join(workdir, "lab")
    procs = []
    lab_up = False
    ferry_runner = None
    libvirt = None
    ssh = None
    shaped = False
    failed = 0

    def on_signal(signum, frame):
        raise KeyboardInterrupt()
    # SIGINT too: a shell starts background jobs with it ignored
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)

    try:
        # Snapshot the binary: a concurrent `cargo build` must not swap the CLI
        # under agents that are already running (their protocols may differ).
        if os.path.exists(args.ferry):
            ferry_copy = os.path.join(workdir, "ferry")
            shutil.copy2(args.ferry, ferry_copy)
            args.ferry = ferry_copy
        # The machine's own limits first, so that a slow machine is not
        # mistaken for a slow Ferry (or the other way round).
        machine_ceilings = ceilings.measure(args.ferry)
        if machine_ceilings:
            log(ceilings.describe(machine_ceilings))
        if "ferry-postcopy" in transports and "--postcopy" not in ferry_help(args.ferry, "migrate"):
            log("`ferry migrate --help` has no --postcopy: skipping ferry-postcopy")
            transports.remove("ferry-postcopy")
        plan = []
        for key, kind, cmdline in kinds:
            ts = [t for t in transports if runs_on(t, key)]
            skipped = [t for t in transports if t not in ts]
            if skipped:
                log("%s: not running %s (post-copy runs only on the fast-dirtying guest)"
                    % (kind, ",".join(skipped)))
            if ts:
                plan.append((key, kind, cmdline, ts))
        if not plan:
            sys.exit("nothing to run: no selected transport runs on the selected guests")
        log("transports: %s" % ",".join(transports))
        # The lab also provides the guest image, so it is brought up even without ferry.
        log("lab up in %s" % labdir)
        lab_up = True
        r = subprocess.run([args.ferry, "lab", "up", "--dir", labdir, "--hosts", "2", "--json",
                            "--netns" if args.netns else "--no-netns"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("lab up failed: %s" % r.stderr.decode())
        lab = json.loads(r.stdout)
        image = os.path.join(lab["images_dir"], lab["guest_image"])
        place = link = None
        if args.netns:
            place = netns.placement(lab, labdir)
            log("between namespaced hosts: %s" % place.describe())
            profile = args.link or "unshaped"
            rate = netns.PROFILES[profile]
            if rate:
                shaped = True
                log(netns.lab_link(args.ferry, labdir, "host1", "--rate", profile))
            capacity = netns.link_capacity(place)
            log("link %s: one TCP stream carries %.2f Gbit/s" % (profile, capacity * 8e-9))
            link = {"profile": profile, "rate_bps": rate, "capacity_Bps": capacity,
                    "placement": place.describe()}
        x509_dir = tls_info = None
        if any(t in X509 for t in transports):
            x509_dir = make_x509_dir(workdir)
        if any(t in TLS for t in transports):
            tls_info = probe_qemu_tls(workdir, x509_dir, procs)
            log("QEMU TLS probe: %s" % tls_info)
        if "ssh" in transports:
            ssh = SshServer(workdir, place)
            log("private sshd on %s:%d (pid %d)" % (ssh.place.dst_addr, ssh.port, ssh.proc.pid))
        plain = PlainRunner(workdir, image, args.memory_mib, procs, x509_dir, ssh, args.streams,
                            place)
        ferry_runner = FerryRunner(args.ferry, lab, workdir, args.memory_mib)
        if any(t in LIBVIRT for t in transports):
            log("lab up --backend libvirt")
            libvirt = LibvirtRunner(args.ferry, workdir, args.memory_mib, x509_dir)

        results = {}
        for key, kind, cmdline, ts in plan:
            results[kind] = {t: [] for t in ts}
            results[kind]["raw"] = []
        for rnd in range(1, args.rounds + 1):
            for ki, (key, kind, cmdline, ts) in enumerate(plan):
                shift = (rnd - 1 + ki) % len(ts)
                order = ts[shift:] + ts[:shift]
                for method in order:
                    name = "b%d%s%s" % (rnd, key[0], method.replace("-", ""))
                    log("round %d %s: %s" % (rnd, kind, method))
                    link_tx = netns.mig_tx_bytes(place) if place is not None else None
                    try:
                        if method in LIBVIRT:
                            res = libvirt.run(name, cmdline, args.settle, method, args.converge_s)
                        elif method in FERRY:
                            res = ferry_runner.run(
                                name, cmdline, args.settle,
                                streams=args.streams + 1 if method == "ferry-multi" else None,
                                postcopy=method == "ferry-postcopy", converge_s=args.converge_s,
                                tpm=method == "ferry-vtpm")
                        else:
                            res = plain.run(name, cmdline, args.settle, method, args.converge_s)
                    except Exception as e:
                        failed += 1
                        res = failed_result(e)
                    if place is not None:
                        res["link_bytes"] = netns.mig_tx_bytes(place) - link_tx
                    log("  " + describe(res))
                    results[kind][method].append(res)
                    raw = dict(res)
                    raw["round"], raw["method"] = rnd, method
                    results[kind]["raw"].append(raw)
        meta = {"memory_mib": args.memory_mib, "fill_mib": args.fill_mib, "rounds": args.rounds,
                "streams": args.streams, "converge_s": args.converge_s, "tls_info": tls_info,
                "agent_rss_mib": ferry_runner.agent_peak_rss_mib() if lab_up else {},
                "ceilings": machine_ceilings, "link": link}
        machine = {"measured": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   "nproc": os.cpu_count() or 0, "qemu": qemu_version()}
        if args.raw_json:
            with open(args.raw_json, "w") as f:
                json.dump({"args": vars(args), "tls": tls_info, "meta": meta, "machine": machine,
                           "argv": argv, "results": results}, f, indent=1)
        output(results, meta, machine, argv, args)
    finally:
        # Finish the cleanup even if Ctrl-C is pressed again.
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if ssh is not None:
            ssh.close()
        if libvirt is not None:
            try:
                libvirt.close()
            except Exception as e:
                log("cleanup of the libvirt lab: %s" % e)
        if ferry_runner is not None:
            try:
                ferry_runner.cleanup()
            except Exception as e:
                log("cleanup of Ferry VMs: %s" % e)
        for p in procs:
            kill_proc(p)
        if shaped:
            try:
                log(netns.lab_link(args.ferry, labdir, "host1", "--clear"))
            except Exception as e:
                log("lab link --clear: %s" % e)
        if lab_up:
            subprocess.run([args.ferry, "lab", "down", "--dir", labdir], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120)
        if args.keep:
            log("kept %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failed:
        log("%d migration(s) failed" % failed)
        sys.exit(1)


if __name__ == "__main__":
    main()
