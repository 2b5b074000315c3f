"""The monitoring report rendered: CSV tables, one self-contained HTML file (inline CSS and
SVG charts, nothing fetched) and a PDF (reportlab, charts as PNG), from a `tables.Report`.

Deterministic: the same report gives the same CSV bytes, and HTML whose only changing line
is the one marked `class="generated"` (the generation time). Charts are matplotlib's
(Agg), with the SVG ids salted by a constant and no date in the metadata.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.ledger.export import kwh
from agent.report.tables import NOT_VALIDATED, TOTAL, Report, Table, daily_series

TITLE = "Monitoring report"
HTML_NAME = "report.html"
PDF_NAME = "report.pdf"
# tables kept to their CSV (the heat map shows completeness_daily)
CSV_ONLY = ("completeness_daily",)
MAX_ROWS = 60  # rows of a long table shown in the HTML/PDF (all of them in its CSV)
SECTIONS = (
    "energy",
    "energy_by_slot",
    "carbon",
    "parameters",
    "completeness",
    "gaps",
    "held",
    "adjustments",
    "quarantine",
    "signatures",
    "meters",
    "meter_policy",
    "daily",
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1100px;color:#1b1f24;padding:0 1em}
h1{font-size:1.7em;margin-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ccd;
padding-bottom:.2em}table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #d5d9e0;padding:.2em .5em;text-align:left;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:600;
background:#f3f5f8}.nv{color:#a40000;font-weight:600}.banner{background:#fff3cd;
border:1px solid #e0b400;padding:.6em 1em;margin:1em 0}.note{color:#555;font-size:.9em}
.generated{color:#777;font-size:.85em}table.heat td{padding:0;width:1.6em;height:1.4em;
text-align:center;font-size:.7em;border:1px solid #fff}table.heat th{font-size:.7em}
.kv td:first-child{color:#555}.wrap{overflow-x:auto}.chart svg{max-width:100%;height:auto}
"""


def _num(x: str) -> bool:
    return bool(x) and x.lstrip("-").replace(".", "", 1).isdigit()


def _mark(rep: Report) -> str:
    return "" if rep.validated else NOT_VALIDATED


def key_figures(rep: Report) -> list[tuple[str, str]]:
    """The cover's figures (label, value), each CO₂e figure with its validation mark."""
    s = rep.summary
    nv = f" ({NOT_VALIDATED})" if not rep.validated else ""
    er = [
        ("Emission reductions, grid-metered", s["er_tco2e_grid_metered"]),
        ("Emission reductions, battery-metered", s["er_tco2e_battery_metered"]),
    ]
    out = [
        ("Period", f"{s['period_from']} to {s['period_to']} (to exclusive)"),
        ("Stations", s["stations"]),
        ("Energy, battery side", f"{s['battery_kwh']} kWh"),
        ("Energy, grid side", f"{s['grid_kwh']} kWh"),
        ("Held (not credited)", f"{kwh(int(s['held_mwh']))} kWh"),
        (
            "Data completeness",
            f"{s['intervals_with_data']} of {s['intervals_expected']} intervals "
            f"({s['completeness_percent'] or '-'} %)",
        ),
    ]
    for label, v in er:
        out.append((label, f"{v} tCO₂e{nv}" if v else (rep.carbon_error or "none")))
    out += [
        ("Carbon parameters", f"set {s['carbon_params']}: {s['carbon_params_status']}"),
        (
            "Signatures verified",
            f"{s['signatures_verified']} of {s['signatures_stored']} stored raw messages"
            if s["signatures_stored"]
            else "not checked",
        ),
    ]
    if s.get("ocpp_stations", "0") != "0":
        out += [
            (
                "OCPP stations",
                f"{s['ocpp_stations']}: {s['ocpp_frames'] or '-'} frames, of which "
                f"{s['ocpp_ocmf_verified'] or '-'} OCMF-signed and verified, "
                f"{s['ocpp_unsigned'] or '-'} unsigned",
            ),
            ("Unsigned energy (OCPP)", f"{s['unsigned_kwh']} kWh"),
        ]
    out += [
        ("Quarantined messages", s["quarantined"] or "not read"),
        ("Adjustment records", s["adjustments"]),
        ("Meters in the register", s["meters"] or rep.tables["meters"].note),
    ]
    return out


# ---- charts -------------------------------------------------------------------------------


def _figure(rep: Report, which: str) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.hashsalt"] = "stationctl-report"
    plt.rcParams["svg.fonttype"] = "none"
    days, bat, grid = daily_series(rep)
    labels = [d[5:] for d in days]
    fig, ax = plt.subplots(figsize=(10, 3.4), dpi=100)
    x = list(range(len(days)))
    if which == "total":
        w = 0.4
        ax.bar([i - w / 2 for i in x], [b / 1e6 for b in bat], w, label="battery side")
        ax.bar([i + w / 2 for i in x], [g / 1e6 for g in grid], w, label="grid side")
        ax.set_title("Daily energy, all stations (kWh)")
    else:
        rows = rep.tables["daily"].rows
        sids = sorted({r[1] for r in rows})
        bottom = [0.0] * len(days)
        index = {d: i for i, d in enumerate(days)}
        for sid in sids:
            vals = [0.0] * len(days)
            for d, s, b, *_ in rows:
                if s == sid and d in index:
                    vals[index[d]] += int(b) / 1e6
            ax.bar(x, vals, 0.8, bottom=bottom, label=sid)
            bottom = [a + b for a, b in zip(bottom, vals, strict=True)]
        ax.set_title("Daily energy per station, battery side (kWh)")
    step = max(1, len(days) // 16)
    ax.set_xticks(x[::step], labels[::step], rotation=0, fontsize=8)
    ax.set_ylabel("kWh")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncols=4 if which != "total" else 2)
    fig.tight_layout()
    return fig


def chart_svg(rep: Report, which: str) -> str:
    import matplotlib.pyplot as plt

    fig = _figure(rep, which)
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # no RDF boilerplate
    return text[text.index("<svg") :]


def chart_png(rep: Report, which: str) -> bytes:
    import matplotlib.pyplot as plt

    fig = _figure(rep, which)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=150, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _heat_color(pct: str) -> str:
    if not pct:
        return "#eeeeee"
    p = float(pct) / 100
    # red (0) → amber → green (1)
    hue = int(120 * p)
    return f"hsl({hue},70%,{55 if p < 1 else 45}%)"


# ---- HTML ---------------------------------------------------------------------------------


def _table_html(t: Table) -> str:
    e = html.escape
    out = [f'<h2 id="{t.name}">{e(t.title)}</h2>']
    if t.note:
        out.append(f'<p class="note">{e(t.note)}</p>')
    if not t.rows:
        out.append('<p class="note">None in this period.</p>')
        return "\n".join(out)
    out.append(
        '<div class="wrap"><table><thead><tr>'
        + "".join(f"<th>{e(h)}</th>" for h in t.header)
        + "</tr>"
    )
    out.append("</thead><tbody>")
    for r in t.rows[:MAX_ROWS] + tuple(x for x in t.rows[MAX_ROWS:] if x[0] == TOTAL):
        cls = ' class="total"' if r[0] == TOTAL else ""
        cells = []
        for h, c in zip(t.header, r, strict=True):
            if h == "status" and c in (NOT_VALIDATED, "overdue", "uncalibrated"):
                cells.append(f'<td class="nv">{e(c)}</td>')
            else:
                cells.append(f'<td class="n">{e(c)}</td>' if _num(c) else f"<td>{e(c)}</td>")
        out.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out.append("</tbody></table></div>")
    if len(t.rows) > MAX_ROWS:
        out.append(f'<p class="note">{len(t.rows) - MAX_ROWS} more rows in {e(t.name)}.csv.</p>')
    return "\n".join(out)


def _heat_html(rep: Report) -> str:
    e = html.escape
    days: list[str] = rep.heat["days"]
    out = [
        '<h2 id="heatmap">Completeness heat map (stations × days)</h2>',
        '<p class="note">Share of the day\'s intervals with data; grey: no interval of the '
        "period that day. Numbers per day in completeness_daily.csv.</p>",
        '<table class="heat"><tr><th></th>' + "".join(f"<th>{e(d[8:])}</th>" for d in days),
    ]
    out[-1] += "</tr>"
    for sid, cells in sorted(rep.heat["heat"].items()):
        row = [f"<th>{e(sid)}</th>"]
        for d, exp, got in cells:
            p = f"{100 * got / exp:.0f}" if exp else ""
            row.append(
                f'<td style="background:{_heat_color(p)}" title="{e(sid)} {e(d)}: {got} of '
                f'{exp} intervals">{p}</td>'
            )
        out.append("<tr>" + "".join(row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def render_html(rep: Report, generated: str, source: str) -> str:
    e = html.escape
    s = rep.summary
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{TITLE} {e(s['period_from'][:10])} to {e(s['period_to'][:10])}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{TITLE}</h1>",
        f"<p>Charging stations, period {e(s['period_from'])} to {e(s['period_to'])} "
        f"(UTC, end exclusive). Source: {e(source)}.</p>",
    ]
    if not rep.validated:
        parts.append(
            f'<p class="banner"><span class="nv">Carbon figures: {NOT_VALIDATED}.</span> '
            f"Parameter set {e(s['carbon_params'])}: "
            f"{e(rep.inputs.params.notice)}</p>"
        )
    parts.append(f'<p class="generated">Generated {e(generated)}</p>')
    parts.append('<h2 id="figures">Key figures</h2><table class="kv">')
    for k, v in key_figures(rep):
        cls = ' class="nv"' if NOT_VALIDATED in v else ""
        parts.append(f"<tr><td>{e(k)}</td><td{cls}>{e(v)}</td></tr>")
    parts.append("</table>")
    parts.append(
        '<p class="note">Every figure is computed from the records <code>stationctl export'
        "</code> gives for the same range; the tables are beside this file as CSV.</p>"
    )
    parts.append('<h2 id="charts">Daily energy</h2>')
    for which in ("total", "stations"):
        parts.append(f'<div class="chart">{chart_svg(rep, which)}</div>')
    for name in SECTIONS:
        parts.append(_table_html(rep.tables[name]))
        if name == "completeness":
            parts.append(_heat_html(rep))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---- PDF ----------------------------------------------------------------------------------


def _font() -> tuple[str, str]:
    """A Unicode TrueType font for the PDF (CO₂e, ×, −): matplotlib's DejaVu Sans, which
    ships inside matplotlib (no system font needed)."""
    import matplotlib
    from reportlab.pdfbase import pdfmetrics
    from reportlab.pdfbase.ttfonts import TTFont

    base = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    try:
        pdfmetrics.getFont("DejaVuSans")
    except KeyError:
        pdfmetrics.registerFont(TTFont("DejaVuSans", str(base / "DejaVuSans.ttf")))
        pdfmetrics.registerFont(TTFont("DejaVuSans-Bold", str(base / "DejaVuSans-Bold.ttf")))
    return "DejaVuSans", "DejaVuSans-Bold"


def _widths(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[float]:
    """Column widths (points) in proportion to their longest cell, capped, filling a
    landscape A4 page's text width (273 mm)."""

    def need(cell: str) -> int:  # text wraps at its spaces, a number must not
        return len(cell) if " " not in cell else min(len(cell), 16)

    longest = [
        min(48, max([need(h), *(need(r[i]) for r in rows)]) + 2) for i, h in enumerate(header)
    ]
    total = 273 * 72 / 25.4
    return [total * n / sum(longest) for n in longest]


def render_pdf(rep: Report, generated: str, source: str, path: Path) -> None:
    from reportlab import rl_config
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4, landscape
    from reportlab.lib.styles import ParagraphStyle
    from reportlab.lib.units import mm
    from reportlab.platypus import (
        Image,
        PageBreak,
        Paragraph,
        SimpleDocTemplate,
        Spacer,
        TableStyle,
    )
    from reportlab.platypus import Table as RLTable

    rl_config.invariant = 1  # no random document id, no creation date inside the file
    font, bold = _font()
    st = {
        "h1": ParagraphStyle("h1", fontName=bold, fontSize=18, leading=22, spaceAfter=6),
        "h2": ParagraphStyle(
            "h2", fontName=bold, fontSize=12, leading=15, spaceBefore=10, keepWithNext=1
        ),
        "sub": ParagraphStyle(
            "sub", fontName=font, fontSize=7.5, leading=9.5, textColor=colors.grey, keepWithNext=1
        ),
        "p": ParagraphStyle("p", fontName=font, fontSize=9, leading=12),
        "note": ParagraphStyle(
            "note", fontName=font, fontSize=7.5, leading=9.5, textColor=colors.grey
        ),
        "nv": ParagraphStyle(
            "nv", fontName=bold, fontSize=9, leading=12, textColor=colors.HexColor("#a40000")
        ),
        "cell": ParagraphStyle("cell", fontName=font, fontSize=6.5, leading=8),
    }
    e = html.escape
    s = rep.summary
    story: list[Any] = [
        Paragraph(TITLE, st["h1"]),
        Paragraph(
            f"Charging stations, period {e(s['period_from'])} to {e(s['period_to'])} "
            f"(UTC, end exclusive). Source: {e(source)}.",
            st["p"],
        ),
    ]
    if not rep.validated:
        story.append(Spacer(1, 4))
        story.append(
            Paragraph(f"Carbon figures: {NOT_VALIDATED}. {e(rep.inputs.params.notice)}", st["nv"])
        )
    story.append(Paragraph(f"Generated {e(generated)}", st["note"]))
    story.append(Spacer(1, 6))
    kv = [[Paragraph(e(k), st["p"]), Paragraph(e(v), st["p"])] for k, v in key_figures(rep)]
    t = RLTable(kv, colWidths=[70 * mm, 170 * mm], hAlign="LEFT")
    t.setStyle(TableStyle([("GRID", (0, 0), (-1, -1), 0.3, colors.lightgrey)]))
    story.append(t)
    story.append(PageBreak())
    story.append(Paragraph("Daily energy", st["h2"]))
    for which in ("total", "stations"):
        story.append(Image(io.BytesIO(chart_png(rep, which)), width=250 * mm, height=85 * mm))

    def table(tb: Table) -> None:
        story.append(Paragraph(e(tb.title), st["h2"]))
        if tb.note:
            story.append(Paragraph(e(tb.note), st["sub"]))
        if not tb.rows:
            story.append(Paragraph("None in this period.", st["note"]))
            return
        rows: Sequence[tuple[str, ...]] = tb.rows[:MAX_ROWS] + tuple(
            x for x in tb.rows[MAX_ROWS:] if x[0] == TOTAL
        )
        data = [[Paragraph(e(h), st["cell"]) for h in tb.header]]
        data += [[Paragraph(e(c), st["cell"]) for c in r] for r in rows]
        rt = RLTable(data, repeatRows=1, hAlign="LEFT", colWidths=_widths(tb.header, rows))
        style = [
            ("GRID", (0, 0), (-1, -1), 0.25, colors.lightgrey),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eef1f5")),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
        ]
        for i, r in enumerate(rows, start=1):
            if r[0] == TOTAL:
                style.append(("BACKGROUND", (0, i), (-1, i), colors.HexColor("#f3f5f8")))
        rt.setStyle(TableStyle(style))
        story.append(rt)
        if len(tb.rows) > MAX_ROWS:
            story.append(
                Paragraph(f"{len(tb.rows) - MAX_ROWS} more rows in {tb.name}.csv.", st["note"])
            )

    for name in SECTIONS:
        table(rep.tables[name])
        if name == "completeness":
            story.append(Paragraph("Completeness heat map (stations × days)", st["h2"]))
            days: list[str] = rep.heat["days"]
            data: list[list[Any]] = [["", *[d[8:] for d in days]]]
            style = [
                ("FONT", (0, 0), (-1, -1), font, 5.5),
                ("GRID", (0, 0), (-1, -1), 0.5, colors.white),
                ("ALIGN", (1, 0), (-1, -1), "CENTER"),
            ]
            for i, (sid, cells) in enumerate(sorted(rep.heat["heat"].items()), start=1):
                row: list[Any] = [sid]
                for j, (_d, exp, got) in enumerate(cells, start=1):
                    p = f"{100 * got / exp:.0f}" if exp else ""
                    row.append(p)
                    frac = got / exp if exp else None
                    c = (
                        colors.HexColor("#eeeeee")
                        if frac is None
                        else colors.Color(1 - 0.6 * frac, 0.45 + 0.4 * frac, 0.35)
                    )
                    style.append(("BACKGROUND", (j, i), (j, i), c))
                data.append(row)
            ht = RLTable(data, hAlign="LEFT")
            ht.setStyle(TableStyle(style))
            story.append(ht)

    def footer(canvas: Any, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont(font, 7)
        canvas.drawString(
            12 * mm,
            8 * mm,
            f"{TITLE} {s['period_from'][:10]} to {s['period_to'][:10]}"
            + ("" if rep.validated else f" · carbon figures: {NOT_VALIDATED}")
            + f" · page {doc.page}",
        )
        canvas.restoreState()

    doc = SimpleDocTemplate(
        str(path),
        pagesize=landscape(A4),
        leftMargin=12 * mm,
        rightMargin=12 * mm,
        topMargin=12 * mm,
        bottomMargin=14 * mm,
        title=f"{TITLE} {s['period_from'][:10]} to {s['period_to'][:10]}",
        author="stationctl report",
    )
    doc.build(story, onFirstPage=footer, onLaterPages=footer)


# ---- all of it ----------------------------------------------------------------------------


def write_csvs(rep: Report, out: Path) -> list[Path]:
    paths = []
    for name in sorted(rep.tables):
        p = out / f"{name}.csv"
        p.write_bytes(rep.tables[name].csv())
        paths.append(p)
    return paths


def write_all(rep: Report, out: Path, generated: str, source: str, pdf: bool = True) -> list[Path]:
    """The CSVs, report.html and (unless `pdf` is False) report.pdf in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = write_csvs(rep, out)
    h = out / HTML_NAME
    h.write_text(render_html(rep, generated, source), encoding="utf-8")
    paths.append(h)
    if pdf:
        p = out / PDF_NAME
        render_pdf(rep, generated, source, p)
        paths.append(p)
    return paths
