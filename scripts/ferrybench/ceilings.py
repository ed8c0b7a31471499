"""This machine's ceilings for the data path, printed before any
migration: `ferry lab ceilings --json` measures AES-GCM and
ChaCha20-Poly1305 (aws-lc-rs, the library behind Ferry's rustls), BLAKE3 and
memcpy on one core, and loopback TCP.  A reader can then tell a slow
machine from a slow Ferry."""

import json
import subprocess

from .common import log

NAMES = {"Aes128Gcm": "AES-128-GCM", "Aes256Gcm": "AES-256-GCM",
         "Chacha20Poly1305": "ChaCha20-Poly1305"}


def measure(ferry):
    """The ceilings as `ferry lab ceilings --json` reports them (bytes per
    second), or None if this ferry binary cannot measure them."""
    try:
        r = subprocess.run([ferry, "lab", "ceilings", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        log("ceilings: %s" % e)
        return None
    if r.returncode != 0:
        log("ceilings: `ferry lab ceilings` failed (older binary?): %s"
            % r.stderr.decode(errors="replace").strip()[:200])
        return None
    return json.loads(r.stdout)


def describe(c):
    """One line of GB/s figures (10^9 bytes per second)."""
    gb = lambda v: "%.2f" % (v / 1e9)
    parts = ["%s seal %s, open %s" % (NAMES.get(a["suite"], a["suite"]), gb(a["seal"]), gb(a["open"]))
             for a in c["aead"]]
    parts.append("BLAKE3 %s (16 KiB updates), %s (256 KiB)" % (gb(c["blake3"]), gb(c["blake3_large"])))
    parts.append("memcpy %s" % gb(c["memcpy"]))
    parts.append("loopback TCP %s" % gb(c["tcp_loopback"]))
    return ("This machine's ceilings (`ferry lab ceilings`; GB/s of one core's CPU time, "
            "loopback TCP in wall-clock time): " + "; ".join(parts) + ".")
