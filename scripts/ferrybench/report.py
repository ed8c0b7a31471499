"""The markdown tables printed at the end of a run and written into
BENCHMARKS.md.

`results` is {guest label: {transport: [one row per round], ..., "raw": [rows
in execution order]}}; the transports of a guest are its keys other than
"raw", in the order they were selected.  A row is a dict of the measured
values; `converged` False marks a migration cancelled at the convergence
budget, `error` one that failed (both have None for every measured value)."""

import os
import re
import statistics

from . import ceilings
from .common import BENCH_MD, DOWNTIME_LIMIT_MS, END_MARK, HB_MS, START_MARK, log
from .transports import FERRY, MULTIFD, POSTCOPY, SECURE, label



def qemu_downtime(r):
    """QEMU's own downtime figure, or None when it cannot be true: after an
    early switch to post-copy QEMU 7.2 reported 13,992,016 ms for a 448 ms
    migration."""
    d, total = r.get("downtime_ms"), r.get("total_ms")
    if d is not None and total is not None and d > total:
        return None
    return d

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


# A guest's vCPU threads as the CPU sampler names them ("process/thread").
GUEST_VCPU = re.compile(r"^qemu-system-[^/]*/CPU \d+/(TCG|KVM)$")


def migration_cpu_per_gb(r):
    """CPU per GB without the guests' vCPU threads: what the migration itself
    cost (QEMU's migration and main threads, the transport).  The bench
    guest's vCPU never idles under TCG: it takes whatever CPU the transport
    leaves free, so counting it rewards the transport that starves the guest
    most.  None without the per-thread split."""
    threads = r.get("cpu_threads")
    if threads is None or r.get("cpu_s") is None or not r.get("bytes"):
        return None
    vcpus = sum(s for name, s in threads.items() if GUEST_VCPU.match(name))
    return (r["cpu_s"] - vcpus) / (r["bytes"] / 1e9)


def transport_cpu_per_gb(r, console=True):
    """CPU per GB of the transport's own processes (Ferry's agents, ssh and
    sshd, stunnel), QEMUs left out.  console=False leaves out what Ferry's
    agents spend logging the guest console (`cpu_console_s`), which the other
    transports do not carry: the script reads their consoles itself,
    uncounted.  None for a Ferry run that did not record it."""
    by = r.get("cpu_by")
    if by is None or not r.get("bytes"):
        return None
    cpu = sum(v for k, v in by.items() if not k.startswith("qemu"))
    if not console and any(k.startswith("agent ") for k in by):
        if r.get("cpu_console_s") is None:
            return None
        cpu -= r["cpu_console_s"]
    return cpu / (r["bytes"] / 1e9)


def console_cpu_per_gb(r):
    """CPU per GB of Ferry's agents' console logging threads, None if not recorded."""
    if r.get("cpu_console_s") is None or not r.get("bytes"):
        return None
    return r["cpu_console_s"] / (r["bytes"] / 1e9)


def transports_of(res_kind):
    return [t for t in res_kind if t != "raw"]


def ok(r):
    return r.get("converged", True) and not r.get("error")


def outcome(rs, converge_s):
    """(every run unusable, note) for runs that did not converge or failed."""
    nc = sum(1 for r in rs if not r.get("error") and r.get("converged") is False)
    fl = sum(1 for r in rs if r.get("error"))
    parts = []
    if nc:
        within = " in %g s" % converge_s if converge_s else ""
        parts.append("did not converge%s" % within if nc == len(rs)
                     else "%d of %d did not converge%s" % (nc, len(rs), within))
    if fl:
        parts.append("failed" if fl == len(rs) else "%d of %d failed" % (fl, len(rs)))
    return bool(rs) and nc + fl == len(rs), "; ".join(parts)


def render(results, meta):
    """meta: memory_mib, fill_mib, rounds, streams, converge_s, tls_info."""
    MB = 1e-6
    streams, converge_s = meta["streams"], meta["converge_s"]
    L = lambda t: label(t, streams, bool(meta.get("link")))
    every = [t for kind in results for t in transports_of(results[kind])]
    out = []
    if meta.get("ceilings"):
        out.append(ceilings.describe(meta["ceilings"]))
        out.append("")
    out.append("Guest: %d MiB RAM, %d MiB filled, 1 vCPU, q35, TCG, heartbeat every %d ms; "
               "max-bandwidth 64 GiB/s, downtime-limit %d ms. %d round(s), every transport once per "
               "round in rotating order; cells are median (min–max). MB = 10^6 bytes, GB = 10^9 bytes."
               % (meta["memory_mib"], meta["fill_mib"], HB_MS, DOWNTIME_LIMIT_MS, meta["rounds"]))
    extra = ""
    if converge_s:
        extra = "A migration not completed %g s after the migrate command is cancelled (QEMU " \
                "`migrate_cancel`, `ferry migrations cancel`) and counted as did not converge." % converge_s
    if any(t in MULTIFD for t in every):
        extra += " Multifd transports use %d channels (Ferry: `--streams %d`, one TLS stream " \
                 "per channel plus the main one)." % (streams, streams + 1)
    if any(t in POSTCOPY for t in every):
        extra += " Plain QEMU post-copy switches after the first pass " \
                 "(`migrate-start-postcopy` once `dirty-sync-count` ≥ 2). Ferry (`--postcopy`) " \
                 "switches after the first pass only when QEMU's rates show the guest dirtying " \
                 "at least half as fast as the link carries, or after 8 passes."
    if extra:
        out.append("")
        out.append(extra.strip())
    if meta.get("tls_info"):
        out.append("")
        out.append("QEMU native TLS negotiated %s (GnuTLS defaults, ECDSA P-256 certificates, "
                   "verify-peer=on on both ends; seen in the ServerHello of a probe migration)."
                   % meta["tls_info"])
    out.append("")
    out.append("| guest | transport | throughput MB/s | guest blackout ms | CPU s per GB "
               "| until new progress ms | QEMU downtime ms | total ms | MB sent "
               "| wall: migrate → dst running ms |")
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for kind in results:
        for t in transports_of(results[kind]):
            rs = results[kind][t]
            cells = [cell([r["throughput"] for r in rs], MB),
                     cell([r["blackout_ms"] for r in rs]),
                     cell([cpu_per_gb(r) for r in rs], d=2),
                     cell([r["progress_ms"] for r in rs]),
                     cell([qemu_downtime(r) for r in rs]),
                     cell([r["total_ms"] for r in rs]),
                     cell([r["bytes"] for r in rs], MB),
                     cell([r["wall_ms"] for r in rs])]
            none_ok, note = outcome(rs, converge_s)
            if none_ok:
                cells[0] = note
            elif note:
                cells[0] += " (%s)" % note
            out.append("| %s | %s | %s |" % (kind, L(t), " | ".join(cells)))
    render_relative(out, results, L)
    render_vtpm(out, results)
    render_vs_secure(out, results, L)
    render_libvirt(out, results)
    render_convergence(out, results, L, converge_s)
    render_raw(out, results)
    return "\n".join(out)


def render_relative(out, results, L):
    if not any("plain-unix" in results[k] for k in results):
        return
    out.append("")
    out.append("Relative to plain QEMU over a unix socket, per round (ratios and differences "
               "are taken within a round, then median (min–max) over rounds):")
    out.append("")
    out.append("| guest | transport | throughput ratio | CPU per GB ratio "
               "| guest blackout − plain ms | until new progress − plain ms |")
    out.append("|---|---|---|---|---|---|")
    for kind in results:
        if "plain-unix" not in results[kind]:
            continue
        base = results[kind]["plain-unix"]
        for t in transports_of(results[kind]):
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
            out.append("| %s | %s | %s | %s | %s | %s |" % (kind, L(t), cell(tr, d=2),
                                                          cell(cr, d=2), cell(bd), cell(pd)))


def render_vtpm(out, results):
    """The cost of a vTPM: ferry-vtpm against ferry, within each round."""
    kinds = [k for k in results if "ferry" in results[k] and "ferry-vtpm" in results[k]]
    if not kinds:
        return
    out.append("")
    out.append("A VM with a vTPM against the same VM without one (Ferry), per round (ratios "
               "and differences within a round, then median (min–max) over rounds):")
    out.append("")
    out.append("| guest | vm start vTPM/none | QEMU downtime vTPM − none ms "
               "| guest blackout vTPM − none ms | total vTPM/none | setup (attested) vTPM/none |")
    out.append("|---|---|---|---|---|---|")
    for kind in kinds:
        cols = [[], [], [], [], []]
        for n, v in zip(results[kind]["ferry"], results[kind]["ferry-vtpm"]):
            if not (ok(n) and ok(v)):
                continue
            for i, (key, diff) in enumerate([("start_ms", False), ("downtime_ms", True),
                                             ("blackout_ms", True), ("total_ms", False),
                                             ("setup_ms", False)]):
                a, b = n.get(key), v.get(key)
                if a is None or b is None or (not diff and not a):
                    continue
                cols[i].append(b - a if diff else b / a)
        out.append("| %s | %s | %s | %s | %s | %s |" % (
            kind, cell(cols[0], d=2), cell(cols[1]), cell(cols[2]), cell(cols[3], d=2),
            cell(cols[4], d=2)))


def render_vs_secure(out, results, L):
    every = set(t for kind in results for t in transports_of(results[kind]))
    secure = [t for t in SECURE if t in every]
    ferries = [t for t in FERRY if t in every]
    if not (secure and ferries):
        return
    multi = ferries != ["ferry"]  # one column more when there is more than plain `ferry`
    out.append("")
    out.append("Ferry against the best existing secure transport of the same round "
               "(%s; best = highest throughput in that round):" % ", ".join(L(t) for t in secure))
    out.append("")
    out.append("| guest | %sbest secure per round | throughput Ferry/best | CPU per GB Ferry/best "
               "| CPU per GB Ferry/QEMU TLS | CPU per GB Ferry/SSH | the same without the "
               "guests' vCPUs | transport CPU per GB "
               "Ferry agents/(ssh + sshd) | the same without the agents' console logging "
               "| guest blackout Ferry − best ms |"
               % ("Ferry | " if multi else ""))
    out.append("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if multi else ""))
    consoles = []
    for kind in results:
        for ft in ferries:
            if ft not in results[kind]:
                continue
            tr, cr, ct, cs, cm, ts, tl, bd = [], [], [], [], [], [], [], []
            names = []
            cc = [console_cpu_per_gb(f) for f in results[kind][ft] if ok(f)]
            if any(c is not None for c in cc):
                consoles.append("%s, %s: %s" % (kind, L(ft), cell(cc, d=3)))
            for i, f in enumerate(results[kind][ft]):
                cands = [(results[kind][t][i]["throughput"] or 0, t) for t in secure
                         if t in results[kind] and i < len(results[kind][t])]
                if not cands:
                    continue
                best_t = max(cands)[1]
                b = results[kind][best_t][i]
                names.append(best_t if ok(b) else "none converged")
                if b["throughput"] and f["throughput"]:
                    tr.append(f["throughput"] / b["throughput"])
                if cpu_per_gb(b) and cpu_per_gb(f) is not None:
                    cr.append(cpu_per_gb(f) / cpu_per_gb(b))
                for other, ratios in (("qemu-tls", ct), ("ssh", cs)):
                    if other in results[kind] and i < len(results[kind][other]):
                        q = results[kind][other][i]
                        if cpu_per_gb(q) and cpu_per_gb(f) is not None:
                            ratios.append(cpu_per_gb(f) / cpu_per_gb(q))
                        theirs, mine = migration_cpu_per_gb(q), migration_cpu_per_gb(f)
                        if other == "ssh" and theirs and mine is not None:
                            cm.append(mine / theirs)
                        if other == "ssh" and transport_cpu_per_gb(q):
                            for ratios, console in ((ts, True), (tl, False)):
                                mine = transport_cpu_per_gb(f, console)
                                if mine is not None:
                                    ratios.append(mine / transport_cpu_per_gb(q))
                if b["blackout_ms"] is not None and f["blackout_ms"] is not None:
                    bd.append(f["blackout_ms"] - b["blackout_ms"])
            out.append("| %s | %s%s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, (L(ft) + " | ") if multi else "", ", ".join(names), cell(tr, d=2),
                cell(cr, d=2), cell(ct, d=2), cell(cs, d=2), cell(cm, d=2), cell(ts, d=2),
                cell(tl, d=2), cell(bd)))
    out.append("")
    out.append("\"Without the guests' vCPUs\" leaves out both QEMUs' `CPU n/TCG` (or `/KVM`) "
               "threads: the bench guest never idles under TCG and takes whatever CPU a "
               "transport leaves free, so counting it charges a transport for the guest's "
               "own work (n/a without the per-thread split).")
    if consoles:
        out.append("")
        out.append("Every CPU figure above counts all of the agents' CPU. Of it, the agents' "
                   "console logging (their `ferry-console` threads: the guest prints a heartbeat "
                   "every %d ms, which the agents timestamp and append to the VM's console log) "
                   "took, in CPU s per GB migrated: %s. The other transports' rows do not carry "
                   "that work: the script reads their consoles itself, uncounted."
                   % (HB_MS, "; ".join(consoles)))


def render_libvirt(out, results):
    """Ferry carrying libvirt against libvirt's own TLS and plain TCP, within each round."""
    kinds = [k for k in results if "ferry-libvirt" in results[k]
             and ("libvirt-tls" in results[k] or "libvirt-tcp" in results[k])]
    if not kinds:
        return
    out.append("")
    out.append("A libvirt domain (machine pc, the same XML for all three) between two libvirtds: "
               "Ferry carrying libvirt's peer-to-peer migration against libvirt's own --tls and "
               "its plain TCP, per round (ratios and differences within a round, then median "
               "(min–max) over rounds; CPU counts both QEMUs, both libvirtds and, for Ferry, both "
               "agents):")
    out.append("")
    out.append("| guest | throughput Ferry/libvirt TLS | CPU per GB Ferry/libvirt TLS "
               "| throughput Ferry/libvirt TCP | CPU per GB Ferry/libvirt TCP "
               "| QEMU downtime Ferry − TCP ms | guest blackout Ferry − TCP ms "
               "| Ferry's resume gate held the loaded VM ms |")
    out.append("|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        cols = [[] for _ in range(6)]
        holds = [f.get("gate_hold_ms") for f in results[kind]["ferry-libvirt"] if ok(f)]
        for i, f in enumerate(results[kind]["ferry-libvirt"]):
            for j, other in ((0, "libvirt-tls"), (2, "libvirt-tcp")):
                if other not in results[kind] or i >= len(results[kind][other]):
                    continue
                o = results[kind][other][i]
                if not (ok(f) and ok(o)):
                    continue
                if o["throughput"] and f["throughput"]:
                    cols[j].append(f["throughput"] / o["throughput"])
                if cpu_per_gb(o) and cpu_per_gb(f) is not None:
                    cols[j + 1].append(cpu_per_gb(f) / cpu_per_gb(o))
                if other == "libvirt-tcp":
                    for c, key in ((4, "downtime_ms"), (5, "blackout_ms")):
                        if f.get(key) is not None and o.get(key) is not None:
                            cols[c].append(f[key] - o[key])
        out.append("| %s | %s | %s | %s | %s | %s | %s | %s |" % (
            kind, cell(cols[0], d=2), cell(cols[1], d=2), cell(cols[2], d=2), cell(cols[3], d=2),
            cell(cols[4]), cell(cols[5]), cell(holds)))


def render_convergence(out, results, L, converge_s):
    """Only when something did not converge or post-copy was measured."""
    rows = [(kind, t) for kind in results for t in transports_of(results[kind])]
    if not any(t in POSTCOPY or any(r.get("converged") is False for r in results[kind][t])
               for kind, t in rows):
        return
    kinds = [k for k in results if any(r.get("converged") is False or t in POSTCOPY
                                       for t in transports_of(results[k]) for r in results[k][t])]
    out.append("")
    out.append("Convergence within %g s (guests where some migration did not converge or "
               "post-copy ran; the cancelled runs' figures are at the moment of cancelling):" % converge_s)
    out.append("")
    out.append("| guest | transport | converged | total ms (converged) | post-copy switch ms "
               "| longest dst HB gap ms (first 2 s) | MB sent before cancel | passes before cancel "
               "| QEMU dirty rate at cancel pages/s |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        for t in transports_of(results[kind]):
            rs = results[kind][t]
            done = [r for r in rs if not r.get("error")]
            conv = [r for r in done if r.get("converged", True)]
            nc = [r for r in done if r.get("converged") is False]
            out.append("| %s | %s | %d of %d%s | %s | %s | %s | %s | %s | %s |" % (
                kind, L(t), len(conv), len(rs),
                " (%d failed)" % (len(rs) - len(done)) if len(done) < len(rs) else "",
                cell([r["total_ms"] for r in conv]),
                cell([r.get("postcopy_switch_ms") for r in conv]),
                cell([r.get("dst_max_hb_gap_ms") for r in conv]),
                cell([r.get("nc_bytes") for r in nc], 1e-6),
                cell([r.get("nc_passes") for r in nc]),
                cell([r.get("nc_dirty_pages_rate") for r in nc])))


def val(v):
    return "n/a" if v is None else str(v)


def render_raw(out, results):
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
            if r.get("error"):
                sent = "failed: %s" % r["error"].replace("|", "/").replace("\n", " ")[:160]
            elif r.get("converged") is False:
                sent = "did not converge (cancelled after %s ms, %s sent)" % (
                    fmt(r.get("nc_ms")), val(r.get("nc_bytes")))
            else:
                sent = val(r["bytes"])
            out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                kind, r["round"], r["method"], sent, fmt(r["total_ms"]), fmt(r["wall_ms"]),
                fmt(qemu_downtime(r)), fmt(r["blackout_ms"]), fmt(r["progress_ms"]),
                val(r["last_src_seq"]), val(r["first_dst_seq"]), val(r["replayed"]),
                val(r["sweep_errors"]), fmt(r.get("cpu_s"), 2), by))


def write_md(table, machine, argv, plot_note=None, marks=(START_MARK, END_MARK)):
    """Replace the section between the markers in BENCHMARKS.md.  machine:
    {"measured": UTC time, "nproc": N, "qemu": version line}."""
    start_mark, end_mark = marks
    header = "\n".join([
        "Measured %s on a machine with nproc=%d, %s." % (machine["measured"], machine["nproc"],
                                                         machine["qemu"]),
        "",
        "Command: `python3 scripts/bench.py %s`" % " ".join(argv),
        "",
    ])
    if plot_note:
        table = table + "\n\n" + plot_note
    section = start_mark + "\n" + header + "\n" + table + "\n" + end_mark
    text = open(BENCH_MD).read() if os.path.exists(BENCH_MD) else ""
    if start_mark in text and end_mark in text:
        a = text.index(start_mark)
        b = text.index(end_mark) + len(end_mark)
        text = text[:a] + section + text[b:]
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + section + "\n"
    with open(BENCH_MD, "w") as f:
        f.write(text)
    log("wrote %s" % BENCH_MD)
