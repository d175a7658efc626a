"""HTML of the reports: one self-contained file per subject (CSS inline, PNGs as base64 data
URIs: opens offline, can be mailed or archived alone) and a group index linking them."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
from pathlib import Path

CSS = """
body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:0;background:#f4f4f4;color:#222}
header{background:#1d2b3a;color:#fff;padding:12px 24px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;font-size:13px;color:#cfd8e3}
nav{background:#fff;border-bottom:1px solid #ccc;padding:6px 24px;font-size:13px}
nav a{margin-right:14px}
main{padding:8px 24px 40px;max-width:1100px}
section{background:#fff;border:1px solid #ddd;border-radius:4px;margin:16px 0;padding:8px 16px}
h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 4px}
figure{margin:0 0 14px} figure img{max-width:100%;display:block}
figcaption{font-size:12px;color:#555;margin-top:3px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#eef} td.l,th.l{text-align:left}
tr.ref td{background:#fff6d8}
pre{background:#f7f7f7;border:1px solid #ddd;padding:6px;font-size:11px;overflow-x:auto}
.methods p{font-size:13px;line-height:1.45} .methods li{font-size:12px}
.qc-warning{background:#fde8e8;border:1px solid #c33;color:#900;padding:6px 10px;font-size:13px}
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_block(title: str, png: bytes, caption: str = "") -> str:
    return (
        f'<figure class="qc-figure"><h3>{esc(title)}</h3>'
        f'<img alt="{esc(title)}" src="{png_data_uri(png)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _warn_style(summary: dict) -> str:
    """Red cell for a run whose report carries a warning (e.g. leftover background)."""
    return " style='background:#fde8e8;color:#900'" if summary.get("warnings") else ""


def warning_block(text: str) -> str:
    """A red box that a reader does not miss (``WARNING: text``)."""
    return f'<p class="qc-warning"><b>WARNING:</b> {esc(text)}</p>'


def section(title: str, body: str, *, anchor: str = "") -> str:
    a = f' id="{esc(anchor)}"' if anchor else ""
    return f"<section{a}><h2>{esc(title)}</h2>{body}</section>"


def _num(v, fmt="{:+.4f}"):
    return "" if v is None else fmt.format(v)


def regions_table(rows: list[dict]) -> str:
    """The regional chi table (values in ppm)."""
    out = [
        '<h3>Regional susceptibility (ppm)</h3><table><tr><th class="l">region</th>'
        '<th class="l">defined by</th><th>voxels</th><th>mean</th><th>median</th>'
        "<th>std</th><th>5th pct</th><th>95th pct</th><th>reference offset</th></tr>"
    ]
    for r in rows:
        cls = ' class="ref"' if r.get("group") == "reference" else ""
        off = r.get("offset")
        out.append(
            f'<tr{cls}><td class="l">{esc(r["region"])}</td><td class="l">{esc(r["group"])}'
            f"</td><td>{r['voxels']}</td><td>{_num(r['mean'])}</td><td>{_num(r['median'])}"
            f"</td><td>{_num(r['std'], '{:.4f}')}</td><td>{_num(r['p5'])}</td>"
            f"<td>{_num(r['p95'])}</td><td>{_num(off) if off is not None else ''}</td></tr>"
        )
    out.append(
        "</table><p style='font-size:12px;color:#555'>Regions come from the images "
        "(no registered atlas): geometric zones of the mask, multi-Otsu classes of the "
        "echo-averaged magnitude and the tails of the chi histogram. The reference "
        "offset is the value subtracted from the unreferenced map so that the "
        "reference region has chi 0.</p>"
    )
    return "".join(out)


def provenance_block(
    meta: dict,
    *,
    timing: dict | None = None,
    report_s: float | None = None,
    fit_details: dict | None = None,
) -> str:
    """Methods with every parameter, seed, acquisition, what the fits found and the time per
    step."""
    out = [
        "<h3>Provenance</h3><table><tr><th class='l'>stage</th><th class='l'>method</th>"
        "<th class='l'>parameters</th></tr>"
    ]
    for stage, m in (meta.get("QSMflowMethods") or {}).items():
        params = ", ".join(f"{k}={v}" for k, v in sorted((m.get("Parameters") or {}).items()))
        out.append(
            f"<tr><td class='l'>{esc(stage)}</td><td class='l'>{esc(m.get('Method'))}"
            f"</td><td class='l'>{esc(params)}</td></tr>"
        )
    out.append("</table>")
    skip = {"QSMflowMethods", "SoftwareVersions", "Sources"}
    facts = {k: v for k, v in meta.items() if k not in skip}
    if facts:
        out.append(
            "<table>"
            + "".join(
                f"<tr><td class='l'>{esc(k)}</td><td class='l'>{esc(_short(v))}</td></tr>"
                for k, v in facts.items()
            )
            + "</table>"
        )
    if fit_details:
        out.append(
            "<table><tr><th class='l'>step</th><th class='l'>fit result</th>"
            "<th class='l'>value</th></tr>"
            + "".join(
                f"<tr><td class='l'>{esc(step)}</td><td class='l'>{esc(k)}</td>"
                f"<td class='l'>{esc(_short(v))}</td></tr>"
                for step, d in fit_details.items()
                for k, v in d.items()
            )
            + "</table>"
        )
    if timing or report_s is not None:
        rows = dict(timing or {})
        if report_s is not None:
            rows["report figures"] = report_s
        total = sum(v for v in rows.values() if v is not None)
        out.append(
            "<table><tr><th class='l'>step</th><th>seconds</th></tr>"
            + "".join(
                f"<tr><td class='l'>{esc(k)}</td><td>{v:.1f}</td></tr>"
                for k, v in rows.items()
                if v is not None
            )
            + f"<tr><td class='l'><b>total</b></td><td><b>{total:.1f}</b>"
            "</td></tr></table>"
        )
    return "".join(out)


def _short(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) < 300 else s[:297] + "..."


def markdown_to_html(text: str) -> str:
    """The small subset of Markdown the methods text uses: headings, paragraphs, numbered
    and bulleted lists."""
    out, para, items, kind = [], [], [], None

    def flush():
        nonlocal para, items, kind
        if para:
            out.append("<p>" + esc(" ".join(para)) + "</p>")
        if items:
            out.append(f"<{kind}>" + "".join(f"<li>{esc(i)}</li>" for i in items) + f"</{kind}>")
        para, items, kind = [], [], None

    for line in text.splitlines():
        s = line.strip()
        m = re.match(r"^(#+)\s+(.*)$", s)
        if not s:
            flush()
        elif m:
            flush()
            level = min(len(m.group(1)) + 2, 6)
            out.append(f"<h{level}>{esc(m.group(2))}</h{level}>")
        elif re.match(r"^\d+\.\s", s) or s.startswith("- "):
            if para:
                flush()
            kind = "ol" if s[0].isdigit() else "ul"
            items.append(re.sub(r"^(\d+\.|-)\s+", "", s))
        else:
            para.append(s)
    flush()
    return '<div class="methods">' + "".join(out) + "</div>"


def subject_page(
    subject: str,
    sections: list[str],
    *,
    summaries: list[dict],
    versions: dict | str,
    methods_md: str = "",
    errors: list[str] = (),
) -> str:
    """The whole ``sub-X.html``."""
    from qsmflow import __version__

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    nav = "".join(
        f'<a href="#{esc(s["prefix"])}">{esc(s["prefix"])}</a>'
        for s in summaries
        if s.get("status", "ok") == "ok"
    )
    nav += '<a href="#methods">Methods</a><a href="index.html">All subjects</a>'
    summary_rows = "".join(
        f"<tr><td class='l'>{esc(s['prefix'])}</td><td>{s.get('mask_voxels', '')}</td>"
        f"<td>{_num(s.get('chi_median_ppm'))}</td>"
        f"<td>{_num(s.get('relative_residual'), '{:.3f}')}</td>"
        f"<td{_warn_style(s)}>{_num(s.get('local_poly_share'), '{:.1%}')}</td>"
        f"<td class='l'>{esc(s.get('reference_region', s.get('status', '')))}</td>"
        f"<td>{_num(s.get('reference_offset_ppm'))}</td></tr>"
        for s in summaries
    )
    vers = (
        versions
        if isinstance(versions, str)
        else ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    errs = (
        section("Errors", "".join(f"<pre style='color:#a00'>{esc(e)}</pre>" for e in errors))
        if errors
        else ""
    )
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>qsmflow: sub-{esc(subject)}</title><style>{CSS}</style></head><body>"
        f"<header><h1>qsmflow report: sub-{esc(subject)}</h1><p>qsmflow {esc(__version__)}; "
        f"generated {now}; {len(summaries)} run(s)</p></header><nav>{nav}</nav><main>"
        + errs
        + section(
            "Summary",
            "<table><tr><th class='l'>run</th><th>mask voxels</th>"
            "<th>median chi (ppm)</th><th>relative residual</th>"
            "<th>local field: polynomial share</th><th class='l'>"
            "reference region</th><th>reference offset (ppm)</th></tr>" + summary_rows + "</table>",
        )
        + "".join(sections)
        + section(
            "Methods",
            markdown_to_html(re.sub(r"^\s*# Methods\s*\n", "", methods_md))
            + f"<h3>Software versions</h3><p style='font-size:12px'>{esc(vers)}</p>",
            anchor="methods",
        )
        + "</main>"
        + summary_script(summaries)
        + "</body></html>\n"
    )


SUMMARY_ID = "qsmflow-summary"


def summary_script(summaries: list[dict]) -> str:
    """The run summaries as JSON inside the page (read back by the group index)."""
    text = json.dumps(summaries).replace("</", "<\\/")
    return f'<script type="application/json" id="{SUMMARY_ID}">{text}</script>'


def read_summary(page) -> list[dict]:
    """The run summaries embedded in a subject page (empty list if none)."""
    m = re.search(
        rf'<script type="application/json" id="{SUMMARY_ID}">(.*?)</script>',
        Path(page).read_text(encoding="utf-8"),
        flags=re.S,
    )
    if not m:
        return []
    try:
        return json.loads(m.group(1).replace("<\\/", "</"))
    except ValueError:
        return []


def group_page(entries: list[dict]) -> str:
    """``index.html``: one row per subject report (``entries``: ``{subject, href, runs}``
    with ``runs`` the run summaries)."""
    from qsmflow import __version__

    rows = []
    for e in entries:
        runs = e.get("runs") or [{}]
        for i, s in enumerate(runs):
            link = (
                f"<a href='{esc(e['href'])}#{esc(s.get('prefix', ''))}'>"
                f"{esc(s.get('prefix', 'sub-' + e['subject']))}</a>"
            )
            meths = ", ".join(f"{k}={v}" for k, v in (s.get("methods") or {}).items())
            rows.append(
                "<tr>"
                + (
                    f"<td class='l' rowspan='{len(runs)}'><a href='{esc(e['href'])}'>"
                    f"sub-{esc(e['subject'])}</a></td>"
                    if i == 0
                    else ""
                )
                + f"<td class='l'>{link}</td><td class='l'>{esc(s.get('status', 'ok'))}</td>"
                f"<td>{_num(s.get('chi_median_ppm'))}</td>"
                f"<td>{_num(s.get('relative_residual'), '{:.3f}')}</td>"
                f"<td{_warn_style(s)}>{_num(s.get('local_poly_share'), '{:.1%}')}</td>"
                f"<td>{_num(s.get('reference_offset_ppm'))}</td>"
                f"<td class='l'>{esc(meths)}</td></tr>"
            )
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>qsmflow: all "
        f"subjects</title><style>{CSS}</style></head><body><header><h1>qsmflow reports</h1>"
        f"<p>qsmflow {esc(__version__)}; {len(entries)} subject(s); generated {now}</p>"
        "</header><main>"
        + section(
            "Subjects",
            "<table><tr><th class='l'>subject</th><th class='l'>run</th>"
            "<th class='l'>status</th>"
            "<th>median chi (ppm)</th><th>relative residual</th>"
            "<th>local field: polynomial share</th><th>reference offset "
            "(ppm)</th><th class='l'>methods</th></tr>" + "".join(rows) + "</table>",
        )
        + "</main></body></html>\n"
    )


def relative_href(page: Path, root: Path) -> str:
    return Path(page).resolve().relative_to(Path(root).resolve()).as_posix()
