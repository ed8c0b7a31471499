#!/usr/bin/env python3
"""Setup latency of a Ferry migration: connect + TLS 1.3 handshake + mutual
TPM attestation (swtpm) + signed offer/accept, before any VM byte moves.

Migrates a small guest back and forth N times in one lab and reports the
median and p95 of `setup_ms` (connect -> both platforms attested) and of the
attestation step alone, next to QEMU's downtime, to show that attestation
sits before the transfer and never inside the downtime.

    cargo build && python3 scripts/bench_setup.py --runs 20
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile

FERRY = os.environ.get("FERRY", os.path.join(os.path.dirname(__file__), "..", "target", "debug", "ferry"))


def ferry(*args, cfg=None):
    env = dict(os.environ)
    if cfg:
        env["FERRY_CLIENT_CONFIG"] = cfg
    out = subprocess.run([FERRY, *args, "--json"], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"ferry {' '.join(args)} failed: {out.stdout}{out.stderr}")
    return json.loads(out.stdout)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="ferry-bench-setup-")
    try:
        lab = ferry("lab", "up", "--dir", d, "--hosts", "2", "--no-netns")
        cfg = lab["client_config"]
        spec = {"name": "s", "memory_mib": 128, "vcpus": 1, "machine": "q35",
                "boot": {"type": "kernel", "kernel": "ferry-guest.elf", "cmdline": "fill_mib=16 dirty=0 hb_ms=50"}}
        path = os.path.join(d, "s.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        ferry("vm", "start", "--host", "host1", "--spec", path, cfg=cfg)
        setup, attest, down, total = [], [], [], []
        here, there = "host1", "host2"
        for _ in range(a.runs):
            r = ferry("migrate", "s", "--to", there, "--host", here, cfg=cfg)
            setup.append(r["setup_ms"]); attest.append(r["attestation"]["ms"])
            down.append(r["qemu_downtime_ms"]); total.append(r["total_ms"])
            here, there = there, here
        print(f"runs {a.runs} (swtpm, loopback, 128 MiB guest)")
        for name, xs in [("setup: connect to both attested (ms)", setup), ("  of which mutual attestation (ms)", attest),
                         ("QEMU downtime (ms)", down), ("total migration (ms)", total)]:
            print(f"{name:<40} median {statistics.median(xs):>6}  p95 {pct(xs, 95):>6}  min {min(xs):>5}  max {max(xs):>5}")
    finally:
        subprocess.run([FERRY, "lab", "down", "--dir", d], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
