"""Modules of scripts/bench.py, Ferry's transport benchmark (stdlib only).

common      constants, logging, process and port helpers
console     the test guest's serial output: READY, heartbeats, blackout
qmp         a minimal QMP client
cpu         CPU accounting from /proc (CpuSampler)
qemutls     x509 files for QEMU's tls-creds-x509 and the TLS probe migration
ssh         a private sshd and `ssh -L` tunnels
plain       QEMU-to-QEMU migrations (plain, multifd, post-copy, QEMU TLS, SSH)
ferry       migrations through a `ferry lab`
transports  transport names, labels, which guests they run on
report      the markdown tables and BENCHMARKS.md
plot        the SVG chart
"""
