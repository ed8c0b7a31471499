"""QEMU-to-QEMU migrations without agents: plain (unix, TCP, multifd,
post-copy), QEMU's native TLS (single channel and multifd), an SSH tunnel
and stunnel."""

import os
import subprocess
import time

from .common import (DOWNTIME_LIMIT_MS, MAX_BW, MIGRATE_TIMEOUT_S, NotConverged, free_port,
                     kill_proc, log, wait_listening)
from .console import SerialReader, migration_result, parse_console, wait_hbs, wait_ready
from .cpu import CpuSampler
from .netns import Placement
from .qmp import QMP
from .stunnel import Stunnel
from .transports import MULTIFD, POSTCOPY, TLS


def not_converged_result(info, cpu_s, cpu_by):
    """The result row of a migration cancelled at the convergence budget."""
    r = {k: None for k in ("bytes", "total_ms", "throughput", "wall_ms", "downtime_ms",
                           "blackout_ms", "last_src_seq", "first_dst_seq", "progress_ms",
                           "replayed", "sweep_errors")}
    r.update({"converged": False, "cpu_s": cpu_s, "cpu_by": cpu_by})
    r.update(info)
    return r


class PlainRunner:
    """Plain QEMU-to-QEMU migrations: every transport but Ferry's."""

    def __init__(self, workdir, image, memory_mib, procs, x509_dir=None, ssh=None, streams=4,
                 place=None):
        self.workdir = workdir
        self.image = image
        self.memory_mib = memory_mib
        self.procs = procs  # shared list for global cleanup
        self.x509_dir = x509_dir
        self.ssh = ssh
        self.streams = streams  # multifd channels
        self.place = place or Placement()  # where the source and destination sides run

    def launch(self, tag, cmdline, incoming, extra=()):
        qmp = os.path.join(self.workdir, tag + ".qmp")
        ser = os.path.join(self.workdir, tag + ".serial")
        for p in (qmp, ser):
            if os.path.exists(p):
                os.unlink(p)
        argv = ["qemu-system-x86_64", "-name", "bench,debug-threads=on",
                "-machine", "q35", "-accel", "tcg", "-cpu", "max",
                "-m", str(self.memory_mib), "-display", "none", "-nodefaults",
                "-kernel", self.image, "-append", cmdline,
                "-qmp", "unix:%s,server=on,wait=off" % qmp,
                "-chardev", "socket,id=s,path=%s,server=on,wait=off" % ser,
                "-serial", "chardev:s"]
        if incoming:
            argv += ["-incoming", "defer", "-S"]
        argv += list(extra)
        argv = self.place.dst(argv) if incoming else self.place.src(argv)
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

    def run(self, name, cmdline, settle_s, transport="plain-unix", converge_s=None):
        """One migration.  converge_s: cancel a migration that has not
        completed (or, for post-copy, not switched to post-copy) that many
        seconds after `migrate`, and return a "did not converge" row."""
        src = dst = tunnel = stun = sampler = None
        tls = transport in TLS
        multifd = transport in MULTIFD
        postcopy = transport in POSTCOPY
        caps = []
        if multifd:
            caps.append({"capability": "multifd", "state": True})
        if postcopy:
            caps.append({"capability": "postcopy-ram", "state": True})
        try:
            src = self.launch(name + "-src", cmdline, incoming=False,
                              extra=self.tls_object("client") if tls else ())
            sp, sq, sr = src
            wait_ready(lambda: sr.snapshot(), name + " (plain src)")
            time.sleep(settle_s)
            dst = self.launch(name + "-dst", cmdline, incoming=True,
                              extra=self.tls_object("server") if tls else ())
            dp, dq, dr = dst
            if caps:
                dq.cmd("migrate-set-capabilities", {"capabilities": caps})
            dparams = {}
            if tls:
                dparams["tls-creds"] = "tls0"
            if multifd:
                dparams["multifd-channels"] = self.streams
            if dparams:
                dq.cmd("migrate-set-parameters", dparams)
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
                listen = "%s:%d" % (self.place.dst_addr, port)
                dq.cmd("migrate-incoming", {"uri": "tcp:" + listen})
                wait_listening(port, "destination QEMU", dp)
                uri = "tcp:" + listen
                # the tunnels' source ends listen on the source side's loopback
                if transport == "ssh":
                    lport = free_port()
                    tunnel = self.ssh.forward(lport, port)
                    uri = "tcp:127.0.0.1:%d" % lport
                if transport == "stunnel":
                    stun = Stunnel(self.workdir, self.x509_dir, name, port, self.place)
                    uri = "tcp:127.0.0.1:%d" % stun.port
            if caps:
                sq.cmd("migrate-set-capabilities", {"capabilities": caps})
            params = {"max-bandwidth": MAX_BW, "downtime-limit": DOWNTIME_LIMIT_MS}
            if tls:
                params.update({"tls-creds": "tls0", "tls-hostname": "localhost"})
            if multifd:
                params["multifd-channels"] = self.streams
            sq.cmd("migrate-set-parameters", params)
            roots = [sp.pid, dp.pid]
            if transport == "ssh":
                roots += [self.ssh.proc.pid, tunnel.pid]
            if stun is not None:
                roots += stun.pids()
            sampler = CpuSampler(roots, zero=[dp.pid])
            sampler.start()
            t0 = time.time()
            sq.cmd("migrate", {"uri": uri})
            if postcopy:
                # The destination was started with -S; `cont` while it is still
                # incoming only sets autostart, so it runs from the switch-over on.
                dq.cmd("cont")
            try:
                src_info, switch_ms, t_run, entered = self._wait_source(sq, dq, t0, postcopy, converge_s)
            except NotConverged as nc:
                cpu_s, cpu_by = sampler.stop()
                sampler = None
                return not_converged_result(nc.info, cpu_s, cpu_by)
            deadline = time.time() + MIGRATE_TIMEOUT_S
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
            if postcopy:
                while t_run is None:
                    if dq.cmd("query-status").get("status") == "running":
                        t_run = time.time()
                    elif time.time() > deadline:
                        raise RuntimeError("post-copy destination never ran")
                    else:
                        time.sleep(0.005)
                wall_ms = (t_run - t0) * 1000.0
            else:
                dq.cmd("cont")
                wall_ms = (time.time() - t0) * 1000.0
            cpu_s, cpu_by = sampler.stop()
            threads = sampler.threads
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
            ram = src_info.get("ram", {})
            res = migration_result(ram.get("transferred"), src_info.get("total-time"), wall_ms,
                                   src_info.get("downtime"), srcc, dstc, cpu_s, cpu_by,
                                   passes=ram.get("dirty-sync-count"))
            res["cpu_threads"] = threads
            if postcopy:
                # migrate-start-postcopy only asks; a migration that completes
                # in the same pass never enters post-copy
                res["postcopy_bytes"] = ram.get("postcopy-bytes")
                res["postcopy_entered"] = entered or bool(ram.get("postcopy-bytes"))
                res["postcopy_switch_ms"] = switch_ms if res["postcopy_entered"] else None
            return res
        finally:
            if sampler is not None:
                sampler.stop_flag.set()
            if tunnel is not None:
                self.ssh.close_tunnel(tunnel)
            if stun is not None:
                stun.close()
            for t in (src, dst):
                if t is None:
                    continue
                p, q, r = t
                q.close()
                r.close()
                kill_proc(p)

    def _wait_source(self, sq, dq, t0, postcopy, converge_s):
        """Poll the source until its migration completed.  For post-copy,
        switch to post-copy once the first pass is done (dirty-sync-count >= 2).
        Cancels (migrate_cancel) at the convergence budget and raises
        NotConverged.  Returns (query-migrate, ms from migrate to
        migrate-start-postcopy or None, time the post-copy destination was seen
        running or None, whether status postcopy-active was seen)."""
        budget = t0 + converge_s if converge_s else None
        deadline = t0 + MIGRATE_TIMEOUT_S
        switched_ms = t_run = None
        cancelled_info = cancelled_at = completed_at = None
        entered = False
        while True:
            info = sq.cmd("query-migrate")
            st = info.get("status")
            now = time.time()
            if st == "completed":
                # QEMU 7.2 reports `completed` a moment before it fills in the
                # total and down times (migration_iteration_finish): a poll in
                # between read total-time 0 once. Ask again, for up to 2 s.
                completed_at = completed_at or now
                if not info.get("total-time") and now < completed_at + 2:
                    time.sleep(0.002)
                    continue
                if cancelled_info is not None:
                    log("  completed while being cancelled at the convergence budget")
                return info, switched_ms, t_run, entered
            if st in ("failed", "cancelled"):
                if cancelled_info is not None:
                    raise NotConverged(cancelled_info)
                raise RuntimeError("plain migration %s: %s" % (st, info))
            ram = info.get("ram", {})
            entered = entered or st == "postcopy-active"
            if (postcopy and switched_ms is None and st == "active"
                    and ram.get("dirty-sync-count", 0) >= 2):
                sq.cmd("migrate-start-postcopy")
                switched_ms = (now - t0) * 1000.0
            if postcopy and switched_ms is not None and t_run is None:
                if dq.cmd("query-status").get("status") == "running":
                    t_run = time.time()
            if cancelled_info is not None and now > cancelled_at + 60:
                raise RuntimeError("migrate_cancel did not end the migration: %s" % info)
            if (budget is not None and now > budget and cancelled_info is None
                    and switched_ms is None and st != "postcopy-active"):
                cancelled_info = {
                    "nc_ms": (now - t0) * 1000.0,
                    "nc_bytes": ram.get("transferred"),
                    "nc_passes": ram.get("dirty-sync-count"),
                    "nc_dirty_pages_rate": ram.get("dirty-pages-rate"),
                    "nc_remaining": ram.get("remaining"),
                }
                log("  not completed after %.0f s (%s passes, %s bytes sent): migrate_cancel"
                    % (converge_s, cancelled_info["nc_passes"], cancelled_info["nc_bytes"]))
                sq.cmd("migrate_cancel")
                cancelled_at = now
            if now > deadline:
                raise RuntimeError("plain migration timed out")
            time.sleep(0.005)
