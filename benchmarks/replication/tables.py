"""The README's per-claim tables and verdicts, regenerated from a study's committed export.

    python benchmarks/replication/tables.py [--dir benchmarks/replication] [--readme README.md]

Reads ``DIR/runs.jsonl`` and ``DIR/summary.json`` (written by ``rank1 study export``), writes
``DIR/tables.md`` and, with ``--readme``, replaces the README's text between the markers
``<!-- claims:begin -->`` and ``<!-- claims:end -->``. Nothing is measured here: anyone can
check the README's numbers against the exported records with this one command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dashboards.claims import claims
from dashboards.stats import best_vs_best

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- claims:begin -->", "<!-- claims:end -->"
VBEGIN, VEND = "<!-- verdicts:begin -->", "<!-- verdicts:end -->"  # the introduction's one sentence per claim


def provenance(summary: dict, caveat: str | None) -> str:
    """Where, when and on what the study ran: the machine, the dates, the wall time, the data, the seeds."""
    cfg = summary["study_config"]
    train = cfg["train"]
    m = summary.get("machine") or {}
    wall = (summary.get("outcome") or {}).get("timings", {}).get("total_s")  # the last driver's
    start, end = (summary.get(k) for k in ("started", "ended"))
    elapsed = None
    if start and end:  # first start to last end: a resumed study's restarts included
        from datetime import datetime

        elapsed = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                   - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
    sub = ", ".join(f"{k} {train[k]:,} (stratified)" for k in ("train_subset", "val_subset") if train.get(k))
    parts = [
        f"Ran on {m.get('cpu', m.get('processor', '?'))} ({m.get('threads', '?')} threads, torch {m.get('torch', '?')}"
        + (f"; {m['source']}" if m.get("source") else "") + ")",
        f"from {start or '?'} to {end or '?'}"
        + (f", {elapsed / 3600:.2f} h elapsed" if elapsed else "")
        + (f" (the last driver's {wall / 3600:.2f} h: the study was resumed)"
           if wall and elapsed and elapsed - wall > 60 else "")
        + (f", {wall / 3600:.2f} h wall time" if wall and not elapsed else ""),
        f"{train.get('dataset')} at {train.get('image_size') or 'native'} px"
        + (f", {sub}" if sub else "") + ", test on the full test split",
        f"{cfg.get('seeds_per_trial')} seeds per cell (seeds {train.get('seed', 0)}..{train.get('seed', 0) + cfg.get('seeds_per_trial', 1) - 1})"
        + (f", {cfg['confirm_seeds']} fresh seeds per arm's best" if cfg.get("confirm_seeds") else ""),
    ]
    return "; ".join(parts) + "." + (f" {caveat}" if caveat else "")


def build(d: Path, by: list[str], select: list[str], caveat: str | None = None) -> tuple[str, str]:
    """``(tables, verdicts)``: the claims section and the verdicts alone (markdown)."""
    recs = [json.loads(line) for line in (d / "runs.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((d / "summary.json").read_text())
    search = [r for r in recs if r["phase"] == "search"]
    confirm = [r for r in recs if r["phase"] == "confirm" and r["status"] == "finished"]
    champ = summary.get("champion") or {}
    rec = next((r for r in search if r["trial_id"] == champ.get("trial_id") and str(r["seed"]) == str(champ.get("seed"))
                and r["arm"] == champ.get("arm")), None)
    champion = None
    if rec is not None:
        arm = rec["arm"]
        champion = {"arm": arm, "metrics": {f"{arm}.{k}": v for k, v in rec["inference"].items()}}
        champion["metrics"].update(summary.get("outcome", {}).get("best", {}).get("metrics", {}))
    c = claims(search, by, select, champion=champion)
    cfg = summary["study_config"]
    train = cfg["train"]
    lines = [f"Study `{summary['study']}`: {train.get('dataset')} ({train.get('root', '')}), "
             f"{cfg.get('n_trials')} grid cells x {cfg.get('seeds_per_trial')} seeds, then "
             f"{cfg.get('confirm_seeds')} fresh seeds for each arm's best configuration; "
             f"{len(search)} (trial, seed, arm) runs and {len(confirm)} confirmation runs; MLflow experiment "
             f"{summary.get('mlflow_experiment_id')}, {len(summary.get('mlflow_run_ids', []))} runs.", "",
             provenance(summary, caveat), ""]
    verdicts = [f"- **{title}.** {c['verdicts'][claim]}" for claim, title in (
        ("trainability", "Trainability"), ("gradient_flow", "Gradient flow"), ("low_rank", "Low-rank outputs"),
        ("fast_inference", "Fast inference")) if claim in c["verdicts"]]
    lines += [*verdicts, "", c["markdown"], ""]
    if c["speed_markdown"]:
        lines += ["**Fast inference**: the registered champion, as deployed where it was trained", "",
                  c["speed_markdown"]]
    accs = {}
    for r in confirm:
        accs.setdefault(r["arm"], []).append(r["test_acc"])
    if accs:
        lines += ["**Tuned best vs best** (each arm's best configuration by its own validation accuracy, retrained "
                  "on fresh seeds, scored on test; Welch 95% interval):", ""]
        for a, b in (("rank1", "flat1d"), ("rank1", "dense"), ("flat1d", "dense")):
            if a in accs and b in accs:
                lines.append(f"- {best_vs_best(a, accs[a], b, accs[b]).sentence}")
    return "\n".join(lines) + "\n", "\n".join(verdicts) + "\n"


def _replace(text: str, begin: str, end: str, body: str, where: Path) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"{where} has no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    return f"{head}{begin}\n{body}{end}{rest.split(end, 1)[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=HERE, help="the export folder (runs.jsonl, summary.json)")
    ap.add_argument("--by", nargs="+", default=["batchnorm", "depth"], help="the cells of the tables")
    ap.add_argument("--select", nargs="*", default=["lr"], help="fields each arm variant takes at its own best")
    ap.add_argument("--readme", type=Path, default=None, help="replace the README's claims section")
    ap.add_argument("--caveat", default=None, help="a sentence on the data to state with the numbers")
    args = ap.parse_args()
    md, verdicts = build(args.dir, args.by, args.select, args.caveat)
    (args.dir / "tables.md").write_text(md)
    if args.readme:
        text = _replace(args.readme.read_text(), BEGIN, END, md, args.readme)
        if VBEGIN in text:
            text = _replace(text, VBEGIN, VEND, verdicts, args.readme)
        args.readme.write_text(text)
    print(md)


if __name__ == "__main__":
    main()
