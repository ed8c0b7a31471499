"""Unit tests of bench.py's accounting (run: python3 scripts/test_ferrybench.py;
tests/scripts.rs runs them in the suite)."""

import os
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ferrybench import report  # noqa: E402
from ferrybench.plot import text_bars  # noqa: E402
from ferrybench.cpu import CLK_TCK, agents_console_seconds, thread_totals  # noqa: E402


def run(cpu_by, console=None, nbytes=1e9, throughput=100e6, blackout=50):
    r = {"bytes": nbytes, "throughput": throughput, "blackout_ms": blackout, "cpu_by": cpu_by,
         "cpu_s": sum(cpu_by.values()), "converged": True}
    if console is not None:
        r["cpu_console_s"] = console
    return r


QEMUS = {"qemu-system-x86_64": 3.0, "qemu-system-x86_64 (dst)": 1.0}


class ThreadAccounting(unittest.TestCase):
    def test_threads_of_one_name_are_summed_and_the_busiest_kept(self):
        names = {(1, 0, "11"): "agent host1/ferry-console", (1, 0, "12"): "agent host1/ferry-console",
                 (1, 0, "13"): "agent host1/tokio-runtime-w"}
        first = {k: 0 for k in names}
        last = {(1, 0, "11"): CLK_TCK, (1, 0, "12"): 3 * CLK_TCK, (1, 0, "13"): 2 * CLK_TCK}
        busiest, sums = thread_totals(first, last, names)
        self.assertEqual(busiest["agent host1/ferry-console"], 3.0)
        self.assertEqual(sums["agent host1/ferry-console"], 4.0)
        self.assertEqual(sums["agent host1/tokio-runtime-w"], 2.0)

    def test_only_the_agents_console_threads_count_as_console_logging(self):
        sums = {"agent host1/ferry-console": 0.25, "agent host2/ferry-console": 0.125,
                "agent host1/tokio-runtime-w": 2.0, "qemu-system-x86_64/ferry-console": 9.0,
                "agent host1/ferry-consoles": 9.0, "ssh/ssh": 9.0}
        self.assertEqual(agents_console_seconds(sums), 0.375)
        self.assertEqual(agents_console_seconds({}), 0)


class TransportCpu(unittest.TestCase):
    def test_console_logging_comes_off_the_agents_only_when_asked(self):
        ferry = run(dict(QEMUS, **{"agent host1": 0.6, "agent host2": 0.4}), console=0.2,
                    nbytes=2e9)
        self.assertAlmostEqual(report.transport_cpu_per_gb(ferry), 0.5)
        self.assertAlmostEqual(report.transport_cpu_per_gb(ferry, console=False), 0.4)
        self.assertAlmostEqual(report.console_cpu_per_gb(ferry), 0.1)
        # all processes, as before: the console logging stays in
        self.assertAlmostEqual(report.cpu_per_gb(ferry), 5.0 / 2)

    def test_other_transports_carry_no_console_logging(self):
        ssh = run(dict(QEMUS, ssh=0.5, sshd=0.5))
        self.assertAlmostEqual(report.transport_cpu_per_gb(ssh), 1.0)
        self.assertAlmostEqual(report.transport_cpu_per_gb(ssh, console=False), 1.0)
        self.assertIsNone(report.console_cpu_per_gb(ssh))

    def test_a_ferry_run_without_the_split_is_not_taken_for_one_without_logging(self):
        old = run(dict(QEMUS, **{"agent host1": 0.6, "agent host2": 0.4}))
        self.assertAlmostEqual(report.transport_cpu_per_gb(old), 1.0)
        self.assertIsNone(report.transport_cpu_per_gb(old, console=False))
        self.assertIsNone(report.console_cpu_per_gb(old))


class VsSecureTable(unittest.TestCase):
    def render(self, consoles):
        rounds = []
        for i, console in enumerate(consoles):
            rounds.append((run(dict(QEMUS, ssh=0.5, sshd=0.5)),
                           run(dict(QEMUS, **{"agent host1": 0.6, "agent host2": 0.4}),
                               console=console, throughput=(120 + i) * 1e6)))
        results = {"idle": {"ssh": [s for s, _ in rounds], "ferry": [f for _, f in rounds]}}
        out = []
        report.render_vs_secure(out, results, lambda t: t)
        return out

    def test_both_ratios_and_the_console_share_are_printed(self):
        out = self.render([0.2, 0.3, 0.1])
        header = next(line for line in out if line.startswith("| guest"))
        self.assertIn("| transport CPU per GB Ferry agents/(ssh + sshd) "
                      "| the same without the agents' console logging |", header)
        row = next(line for line in out if line.startswith("| idle"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        # guest, best, throughput, CPU/best, CPU/QEMU TLS, CPU/SSH, without vCPUs,
        # transport, without console, blackout
        self.assertEqual(cells[7], "1.00 (1.00–1.00)")
        self.assertEqual(cells[8], "0.80 (0.70–0.90)")
        note = next(line for line in out if "console logging (their `ferry-console`" in line)
        self.assertIn("idle, ferry: 0.200 (0.100–0.300)", note)
        self.assertIn("do not carry", note)

    def test_no_console_note_without_the_split(self):
        out = self.render([None, None])
        row = next(line for line in out if line.startswith("| idle"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        self.assertEqual(cells[7], "1.00 (1.00–1.00)")
        self.assertEqual(cells[8], "n/a")
        self.assertEqual(cells[6], "n/a")  # no per-thread split

    def test_the_guests_vcpus_come_off_both_sides(self):
        threads = {"qemu-system-x86_64/CPU 0/TCG": 2.0, "qemu-system-x86_64/live_migration": 0.5,
                   "qemu-system-x86_64 (dst)/CPU 0/TCG": 0.5, "ssh/ssh": 0.5}
        ssh = run(dict(QEMUS, ssh=0.5, sshd=0.5))
        ssh["cpu_threads"] = dict(threads, **{"qemu-system-x86_64/CPU 0/TCG": 1.0})
        ferry = run(dict(QEMUS, **{"agent host1": 0.6, "agent host2": 0.4}))
        ferry["cpu_threads"] = threads
        # ssh: 5.0 - 1.0 - 0.5 = 3.5; ferry: 5.0 - 2.0 - 0.5 = 2.5
        self.assertAlmostEqual(report.migration_cpu_per_gb(ferry), 2.5)
        out = []
        report.render_vs_secure(out, {"idle": {"ssh": [ssh], "ferry": [ferry]}}, lambda t: t)
        row = next(line for line in out if line.startswith("| idle"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        self.assertEqual(cells[5], "1.00")
        self.assertEqual(cells[6], "0.71")
        self.assertFalse(any("ferry-console" in line for line in out))


class TextChart(unittest.TestCase):
    def test_a_bar_runs_to_the_median_and_dots_to_the_maximum(self):
        chart = text_bars([("plain", [0.5, 0.7, 0.6]), ("ferry", [0.25, 0.25, 1.5])], 1.0, width=10)
        plain, ferry = chart.split("\n")
        self.assertEqual(plain, "plain  ██████·   | 0.60 (0.50–0.70)")
        # Beyond the scale the dots stop at its end.
        self.assertEqual(ferry, "ferry  ███·······| 0.25 (0.25–1.50)")

    def test_rows_without_values_say_so_and_no_scale_draws_nothing(self):
        self.assertTrue(text_bars([("x", [None])], 1.0, width=4).endswith("n/a"))
        self.assertEqual(text_bars([("x", [1.0])], 0), "")


if __name__ == "__main__":
    unittest.main()


class PlainCompletion(unittest.TestCase):
    class Qmp:
        def __init__(self, answers):
            self.answers = list(answers)
            self.asked = 0

        def cmd(self, name, args=None):
            self.asked += 1
            return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def test_a_completed_status_without_its_times_is_asked_again(self):
        from ferrybench.plain import PlainRunner
        sq = self.Qmp([{"status": "active", "ram": {}},
                       {"status": "completed", "total-time": 0},
                       {"status": "completed", "total-time": 4321, "downtime": 7}])
        info, switched, t_run, entered = PlainRunner._wait_source(
            None, sq, None, time.time(), False, None)
        self.assertEqual(info["total-time"], 4321)
        self.assertEqual(sq.asked, 3)
