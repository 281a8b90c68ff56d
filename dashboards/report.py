"""The study report: one self-contained HTML file (no network needed) plus a PNG per figure,
written to the study home and logged to the study's parent MLflow run."""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

from dashboards.data import StudyData, load_study_data
from dashboards.figures import SECTIONS, Section, seed_rows

__all__ = ["REPORT_DIR", "build_report", "render_html", "report_study"]

REPORT_DIR = "report"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
.meta{color:#666} .verdict{font-size:1.15em;background:#f6f6f6;border-left:4px solid #c0392b;padding:.8em 1em}
img{max-width:100%;border:1px solid #eee} table{border-collapse:collapse} td,th{padding:.25em .8em;
border-bottom:1px solid #eee;text-align:left} code{background:#f3f3f3;padding:.1em .3em}
nav a{margin-right:1em}
"""


def render_html(data: StudyData, sections: list[Section]) -> str:
    """A self-contained page: styles inline, figures as data: URIs, no script, no network."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>rank1 study report: {e(data.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Study <code>{e(data.name)}</code>: rank-1 vs consecutive 1-D training</h1>",
        f"<p class='meta'>{len(data.trials)} trials recorded ({len(data.finished)} finished, "
        f"{data.seeds_per_trial} seed(s) each) of {data.n_trials_planned} planned · MLflow experiment "
        f"{e(data.experiment_id)}, parent run {e(data.parent_run_id)} · built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p>",
        "<nav>" + "".join(f"<a href='#{s.key}'>{e(s.title.split(':')[0])}</a>" for s in sections) + "</nav>",
    ]
    verdict = next((s for s in sections if s.key == "verdict"), None)
    if verdict and verdict.text:
        parts.append(f"<p class='verdict' id='headline'>{e(verdict.text[0])}</p>")
    for s in sections:
        parts.append(f"<section id='{s.key}' data-section='{s.key}'><h2>{e(s.title)}</h2>")
        for name, png in s.figures:
            b64 = base64.b64encode(png).decode()
            parts.append(f"<figure><img class='figure' alt='{e(name)}' src='data:image/png;base64,{b64}'></figure>")
        for t in s.text:
            parts.append(f"<p>{e(t)}</p>")
        if s.key == "champion" and s.data:
            parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td><code>{e(str(v))}</code></td></tr>"
                                             for k, v in s.data.items()) + "</table>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(data: StudyData, out: Path) -> dict[str, Any]:
    """Write ``out/report.html``, ``out/<figure>.png`` and ``out/verdict.json``."""
    out.mkdir(parents=True, exist_ok=True)
    rows = seed_rows(data)
    sections = []
    for fn in SECTIONS:
        try:
            sections.append(fn(data, rows))
        except Exception as e:  # a broken figure must not take the report down: say what is missing
            s = Section(fn.__name__, fn.__name__.replace("_", " "))
            s.text.append(f"This section could not be drawn ({type(e).__name__}: {e}).")
            sections.append(s)
    for s in sections:
        for name, png in s.figures:
            (out / f"{name}.png").write_bytes(png)
    (out / "report.html").write_text(render_html(data, sections))
    summary = {"sections": [s.key for s in sections], "figures": [n for s in sections for n, _ in s.figures],
               "verdict": next((s.data for s in sections if s.key == "verdict"), {})}
    (out / "verdict.json").write_text(json.dumps(summary["verdict"], indent=2))
    return summary


def report_study(cfg, tracking_uri: str, log: bool = True) -> Path:
    """Build the report of study ``cfg`` into HOME/report and log it to the parent run."""
    from mlflow import MlflowClient

    data = load_study_data(tracking_uri, cfg)
    out = cfg.home_path / REPORT_DIR
    build_report(data, out)
    if log:
        MlflowClient(tracking_uri).log_artifacts(data.parent_run_id, str(out), artifact_path=REPORT_DIR)
    return out / "report.html"
