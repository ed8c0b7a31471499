#!/usr/bin/env python3
"""Reproduce QEMU 7.2's TCG dirty-tracking defect with plain QEMU (no Ferry).

Two QEMUs on this machine, the Ferry test guest dirtying memory, a plain
pre-copy migration over a unix socket, then the guest's own memory checks on
the destination. See docs/known-issues.md.

    python3 scripts/qemu-tcg-dirty-repro.py --runs 8            # some runs corrupt
    python3 scripts/qemu-tcg-dirty-repro.py --runs 8 --tlbflush # none do
"""
import argparse, glob, json, os, socket, subprocess, tempfile, time


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    f.readline()

    def cmd(c, **a):
        f.write(json.dumps({"execute": c, "arguments": a} if a else {"execute": c}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r or "error" in r:
                return r

    cmd("qmp_capabilities")
    return cmd


def one_run(image, accel, cmdline, d):
    common = ["qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max", "-m", "512",
              "-display", "none", "-nodefaults", "-kernel", image, "-append", cmdline]
    src = subprocess.Popen(common + ["-qmp", f"unix:{d}/src.qmp,server=on,wait=off",
                                     "-chardev", f"file,id=s,path={d}/src.log", "-serial", "chardev:s"])
    dst = subprocess.Popen(common + ["-qmp", f"unix:{d}/dst.qmp,server=on,wait=off",
                                     "-chardev", f"file,id=s,path={d}/dst.log", "-serial", "chardev:s",
                                     "-incoming", "defer", "-S"])
    try:
        time.sleep(2.5)
        s, t = qmp(f"{d}/src.qmp"), qmp(f"{d}/dst.qmp")
        t("migrate-incoming", uri=f"unix:{d}/mig.sock")
        time.sleep(0.2)
        s("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        s("migrate", uri=f"unix:{d}/mig.sock")
        while s("query-migrate")["return"].get("status") not in ("completed", "failed"):
            time.sleep(0.01)
        while t("query-migrate")["return"].get("status") != "completed":
            time.sleep(0.01)
        t("cont")
        time.sleep(3)
    finally:
        src.kill()
        dst.kill()
    lines = open(f"{d}/dst.log", errors="replace").read().splitlines()
    corrupt = sum(1 for l in lines if l.startswith("CORRUPT"))
    bad_sweeps = sum(1 for l in lines if l.startswith("SWEEP") and not l.endswith("errors=0"))
    return corrupt, bad_sweeps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--tlbflush", action="store_true", help="guest invlpg's each page before dirtying it")
    ap.add_argument("--accel", default="tcg")
    ap.add_argument("--image", default=None, help="ferry-guest.elf (default: the one cargo built)")
    a = ap.parse_args()
    image = a.image or max(glob.glob("target/*/build/ferry-guest-*/out/ferry-guest.elf"), key=os.path.getmtime)
    cmdline = "fill_mib=256 dirty=256 hb_ms=10" + (" tlbflush=1" if a.tlbflush else "")
    bad = 0
    for i in range(a.runs):
        with tempfile.TemporaryDirectory(prefix="tcg-repro-") as d:
            corrupt, sweeps = one_run(image, a.accel, cmdline, d)
        bad += corrupt > 0 or sweeps > 0
        print(f"run {i + 1}: CORRUPT lines {corrupt}, sweeps with errors {sweeps}")
    print(f"{bad} of {a.runs} migrations corrupted guest memory ({cmdline}, accel {a.accel})")


if __name__ == "__main__":
    main()
