"""An SVG chart (hand-written SVG, no plotting library): grouped bars per
guest and transport, median with min–max whiskers, for throughput and for
CPU seconds per GB."""

import math
import statistics
from xml.sax.saxutils import escape

from .report import cpu_per_gb, outcome, transports_of
from .transports import TRANSPORTS

COLORS = {
    "plain-unix": "#9e9e9e", "plain-tcp": "#616161", "plain-multifd": "#424242",
    "plain-postcopy": "#bdbdbd", "qemu-tls": "#ef8a17", "qemu-tls-multifd": "#b35806",
    "ssh": "#7b3294", "ferry": "#1a9641", "ferry-multi": "#0b5e2a", "ferry-postcopy": "#74c476",
}
FONT = "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\""


def nice_axis(v, n=5):
    """(axis maximum >= v, tick step): about n ticks of 1, 2, 2.5 or 5 times a power of ten."""
    if not v or v <= 0:
        return 1.0, 0.2
    raw = v / n
    e = 10 ** math.floor(math.log10(raw))
    step = next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= raw)
    return math.ceil(v / step - 1e-9) * step, step


def tick_fmt(v):
    return ("%.2f" % v).rstrip("0").rstrip(".") if v < 10 else "%d" % round(v)


def panel(svg, y0, h, x0, width, title, unit, groups, value, converge_s):
    """groups: [(guest, [(transport, label, runs)])]; value(run) -> number or None."""
    stats = []
    top = 0.0
    for guest, bars in groups:
        row = []
        for t, lab, rs in bars:
            xs = [value(r) for r in rs]
            xs = [x for x in xs if x is not None]
            if xs:
                xs.sort()
                n = len(xs)
                m = xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
                row.append((t, lab, (m, xs[0], xs[-1]), rs))
                top = max(top, xs[-1])
            else:
                row.append((t, lab, None, rs))
        stats.append((guest, row))
    ymax, step = nice_axis(top * 1.12)
    plot_top, plot_h = y0 + 28, h - 28 - 40
    sy = lambda v: plot_top + plot_h - plot_h * v / ymax
    svg.append('<text x="%d" y="%d" font-size="14" font-weight="bold" %s>%s</text>'
               % (x0, y0 + 16, FONT, escape(title)))
    for i in range(int(round(ymax / step)) + 1):
        v = step * i
        y = sy(v)
        svg.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e0e0e0"/>' % (x0, y, x0 + width, y))
        svg.append('<text x="%d" y="%.1f" font-size="10" text-anchor="end" %s>%s</text>'
                   % (x0 - 4, y + 3, FONT, tick_fmt(v)))
    svg.append('<text transform="translate(%d,%.1f) rotate(-90)" font-size="11" text-anchor="middle" %s>%s</text>'
               % (x0 - 42, plot_top + plot_h / 2, FONT, escape(unit)))
    svg.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#000"/>'
               % (x0, sy(0), x0 + width, sy(0)))
    nbars = sum(len(row) for _, row in stats)
    gap = 28
    bw = max(8.0, min(34.0, (width - gap * (len(stats) + 1)) / max(1, nbars)))
    # spread the groups over the panel: the room left is shared between the gaps
    gap = max(gap, (width - bw * nbars) / (len(stats) + 1))
    x = x0 + gap
    for guest, row in stats:
        gx = x
        for t, lab, st, rs in row:
            color = COLORS.get(t, "#888")
            if st is None:
                _, note = outcome(rs, converge_s)
                svg.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="none" '
                           'stroke="%s" stroke-dasharray="3,2"/>' % (x + 1, sy(0) - 4, bw - 2, 4, color))
                svg.append('<text transform="translate(%.1f,%.1f) rotate(-90)" font-size="9" fill="#555" %s>'
                           '%s</text>' % (x + bw / 2 + 3, sy(0) - 8, FONT, escape(note or "no data")))
            else:
                m, lo, hi = st
                svg.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s">'
                           '<title>%s: median %.3g (min %.3g, max %.3g), %d run(s)</title></rect>'
                           % (x + 1, sy(m), bw - 2, sy(0) - sy(m), color, escape(lab), m, lo, hi,
                              len([r for r in rs if value(r) is not None])))
                if hi > lo:
                    cx = x + bw / 2
                    svg.append('<path d="M%.1f %.1fV%.1fM%.1f %.1fH%.1fM%.1f %.1fH%.1f" stroke="#000" fill="none"/>'
                               % (cx, sy(lo), sy(hi), cx - 3, sy(lo), cx + 3, cx - 3, sy(hi), cx + 3))
                svg.append('<text transform="translate(%.1f,%.1f) rotate(-90)" font-size="9" %s>%s</text>'
                           % (x + bw / 2 + 3.5, sy(hi) - 6, FONT, tick_fmt(m)))
            x += bw
        svg.append('<text x="%.1f" y="%.1f" font-size="11" text-anchor="middle" %s>%s</text>'
                   % ((gx + x) / 2, sy(0) + 16, FONT, escape(guest)))
        x += gap


def svg_chart(results, converge_s, subtitle, label):
    """The SVG text.  label(t) -> a transport's display name."""
    groups = [(kind, [(t, label(t), results[kind][t]) for t in transports_of(results[kind])])
              for kind in results]
    every = []
    for _, bars in groups:
        for t, lab, _ in bars:
            if t not in [e[0] for e in every]:
                every.append((t, lab))
    every.sort(key=lambda e: TRANSPORTS.index(e[0]) if e[0] in TRANSPORTS else len(TRANSPORTS))
    nbars = sum(len(b) for _, b in groups)
    x0 = 70
    width = max(640, int(nbars * 26 + 28 * (len(groups) + 1)))
    W = x0 + width + 20
    ph = 300
    legend_cols = 2
    legend_rows = (len(every) + legend_cols - 1) // legend_cols
    top = 52
    H = top + 2 * ph + 20 + legend_rows * 18 + 10
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">'
           % (W, H, W, H), '<rect width="100%" height="100%" fill="#fff"/>',
           '<text x="%d" y="22" font-size="15" font-weight="bold" %s>Ferry benchmark</text>' % (x0, FONT),
           '<text x="%d" y="40" font-size="11" fill="#444" %s>%s</text>' % (x0, FONT, escape(subtitle))]
    panel(svg, top, ph, x0, width, "Throughput (median, whiskers min–max)", "MB/s", groups,
          lambda r: r["throughput"] / 1e6 if r.get("throughput") else None, converge_s)
    panel(svg, top + ph, ph, x0, width, "CPU seconds per GB moved (all processes involved)", "CPU s / GB",
          groups, cpu_per_gb, converge_s)
    y = top + 2 * ph + 14
    colw = width // legend_cols
    for i, (t, lab) in enumerate(every):
        lx = x0 + (i % legend_cols) * colw
        ly = y + (i // legend_cols) * 18
        svg.append('<rect x="%d" y="%d" width="12" height="12" fill="%s"/>' % (lx, ly, COLORS.get(t, "#888")))
        svg.append('<text x="%d" y="%d" font-size="11" %s>%s</text>' % (lx + 17, ly + 10, FONT, escape(lab)))
    svg.append("</svg>")
    return "\n".join(svg) + "\n"


def text_bars(rows, scale, width=40):
    """A bar chart in plain text, for BENCHMARKS.md (an image there would be
    a generated file): rows are (label, [values]); each bar runs to the
    median, `·` marks the rest of the min–max range, `|` the scale's end.
    Values are drawn as fractions of `scale` (bars longer than it stop there)."""
    if not rows or not scale or scale <= 0:
        return ""
    name_w = max(len(label) for label, _ in rows)
    out = []
    for label, values in rows:
        vs = sorted(v for v in values if v is not None)
        if not vs:
            out.append("%s  %s  n/a" % (label.ljust(name_w), " " * width))
            continue
        lo, med, hi = vs[0], statistics.median(vs), vs[-1]
        cells = lambda v: max(0, min(width, int(v / scale * width + 0.5)))  # noqa: E731
        bar = ["█" if i < cells(med) else " " for i in range(width)]
        for i in range(cells(lo), cells(hi)):
            if bar[i] == " ":
                bar[i] = "·"
        out.append("%s  %s| %.2f (%.2f–%.2f)" % (label.ljust(name_w), "".join(bar), med, lo, hi))
    return "\n".join(out)
