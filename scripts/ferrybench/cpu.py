"""CPU accounting: utime + stime from /proc/PID/stat of the processes
involved in a migration."""

import os
import threading

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_stat(pid, path=None):
    """(ppid, utime+stime ticks, starttime) of a process (or of the thread at
    path, /proc/PID/task/TID/stat), or None if it is gone."""
    try:
        with open(path or "/proc/%d/stat" % pid, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] = state (field 3); utime/stime are fields 14/15, starttime 22
    return int(rest[1]), int(rest[11]) + int(rest[12]), int(rest[19])


def read_cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


class CpuSampler(threading.Thread):
    """Sums utime+stime of a set of processes while a migration runs.

    roots   pids counted with all their descendants;
    match   optional predicate on a process's argv, for processes outside the
            tree (QEMU daemonizes, so the agents' QEMUs are reparented to init);
    zero    pids counted from their start (baseline 0) rather than from now;
    names   {pid: name} for processes whose argv[0] would not tell them apart.
    Processes that appear after the first scan are counted from their start.
    /proc is scanned every `interval` s; a process that exits loses at most
    the CPU it used since the last scan.
    """

    def __init__(self, roots, match=None, zero=(), interval=0.1, names=None):
        super().__init__(daemon=True)
        self.roots = set(p for p in roots if p)
        self.match = match
        self.zero = set(zero)
        self.interval = interval
        self.first = {}   # (pid, starttime) -> ticks at first sighting
        self.last = {}    # (pid, starttime) -> latest ticks
        self.names = {}
        self.given_names = dict(names or {})
        # per thread: a process at 0.6 of a core may have one thread at 1.0
        self.thread_first, self.thread_last, self.thread_names = {}, {}, {}
        self.threads, self.thread_sums = {}, {}
        self.cmd_cache = {}
        self.stop_flag = threading.Event()
        self.scans = 0

    def scan(self):
        stats = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            st = read_stat(int(d))
            if st is not None:
                stats[int(d)] = st
        children = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        included = set()
        todo = [p for p in self.roots if p in stats]
        while todo:
            p = todo.pop()
            if p in included:
                continue
            included.add(p)
            todo.extend(children.get(p, []))
        if self.match is not None:
            for pid, (_, _, start) in stats.items():
                if pid in included:
                    continue
                key = (pid, start)
                if key not in self.cmd_cache:
                    self.cmd_cache[key] = self.match(read_cmdline(pid))
                if self.cmd_cache[key]:
                    included.add(pid)
        for pid in included:
            _, ticks, start = stats[pid]
            key = (pid, start)
            if key not in self.first:
                self.first[key] = 0 if (self.scans > 0 or pid in self.zero) else ticks
                argv = read_cmdline(pid) or ["?"]
                # the two QEMUs apart, to tell which end is the bottleneck
                role = " (dst)" if "-incoming" in argv else ""
                self.names[key] = self.given_names.get(pid) or os.path.basename(argv[0]) + role
            self.last[key] = ticks
            self.scan_threads(pid, key, pid in self.zero)
        self.scans += 1

    def scan_threads(self, pid, key, zero):
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            return
        for tid in tids:
            st = read_stat(pid, "/proc/%d/task/%s/stat" % (pid, tid))
            if st is None:
                continue
            tkey = key + (tid,)
            if tkey not in self.thread_first:
                self.thread_first[tkey] = 0 if (self.scans > 0 or zero) else st[1]
                try:
                    with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                self.thread_names[tkey] = "%s/%s" % (self.names[key], comm)
            self.thread_last[tkey] = st[1]

    def start(self):
        self.scan()
        super().start()

    def run(self):
        while not self.stop_flag.wait(self.interval):
            self.scan()

    def stop(self):
        """Final scan; returns (cpu seconds, {process name: seconds})."""
        self.stop_flag.set()
        self.join()
        self.scan()
        by_name = {}
        total = 0
        for key, t in self.last.items():
            d = t - self.first[key]
            total += d
            by_name[self.names[key]] = by_name.get(self.names[key], 0) + d / CLK_TCK
        self.threads, self.thread_sums = thread_totals(self.thread_first, self.thread_last,
                                                       self.thread_names)
        return total / CLK_TCK, by_name


def thread_totals(first, last, names):
    """({process/thread: seconds} of the busiest thread of each name (a
    bottleneck is one thread), {process/thread: seconds} of all threads of
    each name), from the ticks at first sighting and at the last scan."""
    busiest, sums = {}, {}
    for tkey, t in last.items():
        name, s = names[tkey], (t - first[tkey]) / CLK_TCK
        busiest[name] = max(s, busiest.get(name, 0))
        sums[name] = sums.get(name, 0) + s
    return busiest, sums


# The agents' console logger thread (crates/ferry-agent/src/backend/qemu/console.rs)
CONSOLE_THREAD = "ferry-console"


def agents_console_seconds(thread_sums):
    """CPU seconds of the agents' console logging threads, from thread_sums
    ({"agent HOST/comm": seconds}).  The other transports' consoles are read
    by this script, uncounted, so a like-for-like comparison leaves it out."""
    return sum(s for name, s in thread_sums.items()
               if name.startswith("agent ") and name.endswith("/" + CONSOLE_THREAD))
