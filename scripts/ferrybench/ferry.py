"""Migrations through a `ferry lab`: `ferry migrate` between its two agents."""

import json
import os
import subprocess
import time

from .common import MIGRATE_TIMEOUT_S, kill_proc, log
from .console import migration_result, parse_console, read_console_file, wait_hbs, wait_ready
from .cpu import CpuSampler, agents_console_seconds
from .plain import not_converged_result


def ferry_help(ferry, *cmd):
    try:
        r = subprocess.run([ferry] + list(cmd) + ["--help"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=30)
        return r.stdout.decode("utf-8", "replace")
    except Exception:
        return ""


class FerryRunner:
    def __init__(self, ferry, lab, workdir, memory_mib):
        self.ferry = ferry
        self.lab = lab
        self.workdir = workdir
        self.memory_mib = memory_mib
        self.hosts = {h["name"]: h for h in lab["hosts"]}
        self.live = []  # (vm, host) to stop on failure
        self.migrating = None  # a running `ferry migrate`, killed on failure

    def agent_names(self):
        """{pid: "agent HOST"} of the lab's agents."""
        names = {}
        for h in self.lab["hosts"]:
            try:
                with open(h["pid_file"]) as f:
                    names[int(f.read().strip())] = "agent %s" % h["name"]
            except (OSError, ValueError, KeyError):
                log("warning: no agent pid for %s; its CPU is not counted" % h.get("name"))
        return names

    def agent_pids(self):
        return list(self.agent_names())

    def agent_peak_rss_mib(self):
        """{host: VmHWM in MiB}: each agent's peak resident memory so far,
        over every migration of the batch (the goal: bounded, < 64 MiB,
        whatever the VM size)."""
        out = {}
        for h, pid in zip(self.lab["hosts"], self.agent_pids()):
            try:
                with open("/proc/%d/status" % pid) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            out[h["name"]] = int(line.split()[1]) / 1024.0
            except OSError:
                pass
        return out

    def argv(self, *args):
        return [self.ferry] + list(args) + ["--client-config", self.lab["client_config"], "--json"]

    def fer(self, *args, check=True, timeout=MIGRATE_TIMEOUT_S):
        argv = self.argv(*args)
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError("%s failed (rc=%d): %s %s" % (" ".join(argv), r.returncode,
                                                           r.stdout.decode(), r.stderr.decode()))
        return r

    def outgoing_id(self, name):
        """Id of the newest migration of VM name that host1 is sending, if any."""
        r = self.fer("migrations", "list", "--host", "host1", check=False, timeout=60)
        try:
            doc = json.loads(r.stdout)
        except ValueError:
            return None
        migs = doc.get("migrations", []) if isinstance(doc, dict) else doc
        ids = [m["id"] for m in migs if isinstance(m, dict) and m.get("vm") == name
               and m.get("role") == "source"]
        return ids[-1] if ids else None

    def migrate(self, name, extra, converge_s):
        """Runs `ferry migrate`; at the convergence budget cancels it with
        `ferry migrations cancel ID`.  Returns (rc, stdout, t_return, cancel
        info or None)."""
        out_path = os.path.join(self.workdir, name + ".migrate.out")
        err_path = os.path.join(self.workdir, name + ".migrate.err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = subprocess.Popen(self.argv("migrate", name, "--to", "host2", "--host", "host1", *extra),
                                 stdout=out, stderr=err, start_new_session=True)
        self.migrating = p
        t0 = time.time()
        cancel = None
        try:
            try:
                p.wait(timeout=converge_s if converge_s else MIGRATE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                if not converge_s:
                    raise RuntimeError("ferry migrate timed out")
                cancel = {"nc_ms": (time.time() - t0) * 1000.0}
                mid = None
                for _ in range(20):
                    mid = self.outgoing_id(name)
                    if mid is not None or p.poll() is not None:
                        break
                    time.sleep(0.25)
                if mid is not None and p.poll() is None:
                    shown = self.fer("migrations", "show", mid, "--host", "host1", check=False, timeout=60)
                    try:
                        # the record's byte count is final only: 0 here means not known
                        cancel["nc_bytes"] = json.loads(shown.stdout).get("bytes") or None
                    except (ValueError, AttributeError):
                        pass
                    log("  not completed after %.0f s (%s bytes sent): ferry migrations cancel %s"
                        % (converge_s, cancel.get("nc_bytes"), mid))
                    r = self.fer("migrations", "cancel", mid, "--host", "host1", check=False, timeout=60)
                    if r.returncode != 0:
                        log("  cancel refused (rc=%d): %s %s" % (r.returncode, r.stdout.decode().strip(),
                                                               r.stderr.decode().strip()))
                    cancel["id"] = mid
                elif p.poll() is not None:
                    log("  ferry migrate ended at the convergence budget, before it could be cancelled")
                p.wait(timeout=MIGRATE_TIMEOUT_S)
            t_ret = time.time()
        finally:
            if p.poll() is None:
                kill_proc(p)
            self.migrating = None
        with open(out_path, "rb") as f:
            stdout = f.read()
        if p.returncode != 0 and cancel is None:
            with open(err_path, "rb") as f:
                raise RuntimeError("ferry migrate failed (rc=%d): %s %s" % (
                    p.returncode, stdout.decode(), f.read().decode()))
        return p.returncode, stdout, t_ret, cancel

    def run(self, name, cmdline, settle_s, streams=None, postcopy=False, converge_s=None,
            tpm=False):
        """One `ferry migrate`; streams: its --streams (None = the agent's
        default, 1); postcopy: pass --postcopy; tpm: the VM gets a vTPM
        (tpm-crb on its own swtpm), which the guest uses at boot."""
        if tpm:
            cmdline += " tpm=FERRYBENCH tpm_ms=0"
        spec = {"name": name, "memory_mib": self.memory_mib, "vcpus": 1, "machine": "q35",
                "boot": {"type": "kernel", "kernel": self.lab["guest_image"], "cmdline": cmdline}}
        if tpm:
            spec["tpm"] = "crb"
        spec_path = os.path.join(self.workdir, name + ".json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        extra = []
        if streams is not None:
            extra += ["--streams", str(streams)]
        if postcopy:
            extra.append("--postcopy")
        try:
            self.live.append((name, "host1"))
            t_start = time.time()
            vm = json.loads(self.fer("vm", "start", "--spec", spec_path, "--host", "host1").stdout)
            start_ms = (time.time() - t_start) * 1000.0
            src_log = vm["console_log"]
            wait_ready(lambda: read_console_file(src_log), name + " (ferry src)")
            time.sleep(settle_s)
            # -name guest=NAME,debug-threads=on (older agents: guest=NAME)
            guest_arg = "guest=" + name
            is_guest = lambda argv: any(a == guest_arg or a.startswith(guest_arg + ",")
                                        for a in argv)
            # the source's and the destination's agent apart, to name a bottleneck
            names = self.agent_names()
            sampler = CpuSampler(list(names), match=is_guest, names=names)
            sampler.start()
            t0 = time.time()
            try:
                rc, stdout, t_ret, cancel = self.migrate(name, extra, converge_s)
            finally:
                cpu_s, cpu_by = sampler.stop()
            try:
                mig = json.loads(stdout)
            except ValueError:
                mig = {}
            if cancel is not None and mig.get("state") != "completed":
                if "id" not in cancel:
                    raise RuntimeError("ferry migrate over the convergence budget and no "
                                       "outgoing migration to cancel: %s" % stdout.decode())
                log("  ferry migrate returned rc=%d: %s" % (rc, stdout.decode().strip()[:300]))
                self.fer("vm", "stop", name, "--host", "host1", check=False, timeout=60)
                self.live.pop()
                info = {k: v for k, v in cancel.items() if k != "id"}
                r = not_converged_result(info, cpu_s, cpu_by)
                r["id"] = cancel["id"]
                return r
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
            self.fer("vm", "stop", name, "--host", "host2", check=False, timeout=60)
            self.live.pop()
            # QEMU's own clock of its migration, as for the QEMU transports;
            # the record's end-to-end time (setup, the destination's launch,
            # the gate, the Receipt) stays in the raw JSON and in wall_ms.
            qemu_ms = mig.get("qemu_total_ms") or mig.get("total_ms")
            return migration_result(mig.get("bytes"), qemu_ms, wall_ms,
                                    mig.get("qemu_downtime_ms"), srcc, dstc, cpu_s, cpu_by,
                                    id=mig["id"], streams=mig.get("streams"),
                                    postcopy_allowed=mig.get("postcopy"), start_ms=start_ms,
                                    setup_ms=mig.get("setup_ms"), cpu_threads=sampler.threads,
                                    record_total_ms=mig.get("total_ms"),
                                    cpu_console_s=agents_console_seconds(sampler.thread_sums))
        except Exception:
            self.cleanup()
            raise

    def cleanup(self):
        if self.migrating is not None:
            kill_proc(self.migrating)
            self.migrating = None
        for name, host in self.live:
            for h in ("host1", "host2"):
                self.fer("vm", "stop", name, "--host", h, check=False, timeout=60)
        self.live = []
