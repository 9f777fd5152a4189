#!/usr/bin/env python3
"""Draw the layout of a Grafana dashboard JSON as an SVG wireframe.

This is not a screenshot and shows no data: it places every panel where the
dashboard's gridPos puts it (Grafana's 24-column grid) and writes in each its
title, type, unit and the metrics and legends of its queries. It exists so
docs/ can show what the dashboard contains without a running Grafana.

    python3 deploy/grafana/render_layout.py \
        deploy/grafana/comfygate-dashboard.json docs/grafana-dashboard.svg

Standard library only.
"""

import json
import re
import sys
from xml.sax.saxutils import escape

COL = 50          # pixels per grid column (24 columns)
ROW = 30          # pixels per grid row (Grafana's row height is 30px)
PAD = 4           # gap between panels
MARGIN = 20
HEADER = 70       # space for the title and the disclaimer
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"

METRIC = re.compile(r"\b(comfygate_[a-z0-9_]+)")


def clip(text, width_px, char_px):
    """Cut text to fit width_px at about char_px per character."""
    n = max(4, int(width_px / char_px))
    return text if len(text) <= n else text[: n - 1] + "…"


def panel_lines(p):
    """What to write inside a panel: its queries' metrics and legends."""
    lines = []
    for t in p.get("targets", []):
        expr = t.get("expr", "")
        metrics = list(dict.fromkeys(METRIC.findall(expr)))  # in order, once each
        fn = ""
        if ") / sum(" in expr:
            fn = "ratio of rates of "
        elif "histogram_quantile" in expr:
            q = re.search(r"histogram_quantile\(([0-9.]+)", expr)
            fn = "quantile %s of " % q.group(1) if q else "quantile of "
        elif "increase(" in expr:
            fn = "increase of "
        elif "rate(" in expr:
            fn = "rate of "
        legend = t.get("legendFormat", "")
        line = fn + " − ".join(metrics)
        if legend:
            line += "  ⇒ " + legend
        lines.append(line)
    return lines


def render(dash):
    panels = dash["panels"]
    bottom = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    width = 2 * MARGIN + 24 * COL
    height = HEADER + MARGIN + bottom * ROW
    out = [
        '<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">'
        % (width, height, width, height),
        '<rect width="100%" height="100%" fill="#f4f5f5"/>',
        '<text x="%d" y="30" font-family="%s" font-size="20" font-weight="bold" fill="#222">'
        "Grafana dashboard “%s”: panel layout</text>" % (MARGIN, FONT, escape(dash.get("title", ""))),
        '<text x="%d" y="52" font-family="%s" font-size="12" fill="#a33">'
        "Layout rendering drawn by deploy/grafana/render_layout.py from the dashboard JSON: "
        "positions, titles and queries only. Not a screenshot; no data.</text>" % (MARGIN, FONT),
    ]
    variables = [v["name"] for v in dash.get("templating", {}).get("list", [])]
    if variables:
        out.append(
            '<text x="%d" y="52" text-anchor="end" font-family="%s" font-size="12" fill="#555">'
            "variables: %s</text>" % (width - MARGIN, FONT, escape(", ".join("$" + v for v in variables)))
        )

    for p in panels:
        g = p["gridPos"]
        x = MARGIN + g["x"] * COL + PAD / 2
        y = HEADER + g["y"] * ROW + PAD / 2
        w = g["w"] * COL - PAD
        h = g["h"] * ROW - PAD
        title = escape(p.get("title", ""))
        if p["type"] == "row":
            out.append('<rect x="%g" y="%g" width="%g" height="%g" fill="#dde3ea"/>' % (x, y, w, h))
            out.append(
                '<text x="%g" y="%g" font-family="%s" font-size="14" font-weight="bold" fill="#223">▾ %s</text>'
                % (x + 8, y + h / 2 + 5, FONT, title)
            )
            continue
        out.append(
            '<rect x="%g" y="%g" width="%g" height="%g" rx="3" fill="#ffffff" stroke="#b8bec6"/>' % (x, y, w, h)
        )
        out.append(
            '<text x="%g" y="%g" font-family="%s" font-size="13" font-weight="bold" fill="#222">%s</text>'
            % (x + 8, y + 18, FONT, escape(clip(p.get("title", ""), w - (16 if p["type"] == "stat" else 110), 7.5)))
        )
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        tag = p["type"] + (" · " + unit if unit else "")
        # Stat panels are narrow: their type goes in the bottom corner.
        tag_y = y + h - 8 if p["type"] == "stat" else y + 17
        out.append(
            '<text x="%g" y="%g" text-anchor="end" font-family="%s" font-size="10" fill="#777">%s</text>'
            % (x + w - 8, tag_y, FONT, escape(tag))
        )
        if p["type"] == "stat":
            out.append(
                '<text x="%g" y="%g" text-anchor="middle" font-family="%s" font-size="11" fill="#b0b5bb">'
                "single value (no data)</text>" % (x + w / 2, y + h / 2 + 22, FONT)
            )
        lines = panel_lines(p)
        if p["type"] == "timeseries":
            # Empty axes, to show the kind of panel; there is no data here.
            ax, ay, aw, ah = x + 10, y + 28, w - 20, h - 40 - 13 * len(lines)
            if ah > 20:
                out.append(
                    '<path d="M%g %g V%g H%g" fill="none" stroke="#d0d4d9"/>' % (ax, ay, ay + ah, ax + aw)
                )
                out.append(
                    '<text x="%g" y="%g" text-anchor="middle" font-family="%s" font-size="11" fill="#b0b5bb">'
                    "time series (no data in a layout rendering)</text>" % (ax + aw / 2, ay + ah / 2, FONT)
                )
        ly = y + h - 10 - 13 * (len(lines) - 1)
        if p["type"] == "stat":
            ly = y + 36
        for line in lines:
            out.append(
                '<text x="%g" y="%g" font-family="%s" font-size="10" fill="#345">%s</text>'
                % (x + 8, ly, MONO, escape(clip(line, w - 16, 6.1)))
            )
            ly += 13
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: render_layout.py DASHBOARD.json OUT.svg")
    with open(sys.argv[1], encoding="utf-8") as f:
        dash = json.load(f)
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        f.write(render(dash))


if __name__ == "__main__":
    main()
