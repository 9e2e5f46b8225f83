"""report.html: one self-contained file (images inlined as base64, inline CSS, no scripts, nothing fetched)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from vlsafe.report.markdown import (CLAIM_HEADER, SHORT, cell, claim_rows, columns, commits, evaluated_in,
                                    heldout_table, pct, ran_on, spread_table)

CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;
vertical-align:top}th{background:#eee}.reproduced{background:#d4f7d4}.not_reproduced{background:#f7d4d4}
.inconclusive{background:#f7f1d4}img{max-width:100%;border:1px solid #ddd}.small{font-size:11px;color:#555}"""


def _table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        attr = f' class="{classes[i]}"' if classes else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in row) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def render(results: dict, plots: dict[str, Path]) -> str:
    name = html.escape(str(results["config"].get("name", "study")))
    state = "complete" if results["complete"] else f"partial ({results['stages_done']}/{results['stages_planned']})"
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>vlsafe study: {name}</title>"
             f"<style>{CSS}</style></head><body><h1>Study report: {name}</h1>",
             f"<p>Run {state}; git {html.escape(commits(results['git']))}; judges "
             f"{html.escape(', '.join(results['judges']))}; seeds {html.escape(str(results['config'].get('seeds')))}"
             "</p>"]
    if results["failed"]:
        parts.append(f"<p><b>Failed stage:</b> {html.escape(results['failed']['stage'])}: "
                     f"{html.escape(results['failed']['error'])}</p>")
    claims = results["claims"]
    parts.append("<h2>Claims</h2>" + _table(CLAIM_HEADER, claim_rows(results), [c["verdict"] for c in claims]))
    parts.append("<p class='small'>Paired over the same items, pooled over the training seeds (n items in each "
                 "seed); the seed spread is each seed's own difference.</p>")
    typo = ("perceived (legibility probe above chance)" if results["typo_perceived"] else
            "<b>not perceived</b>: the legibility probe is at chance, so typographic ASR is not a safety measurement")
    parts.append(f"<p>Typographic condition: {typo}</p><ul>" + "".join(
        f"<li>{html.escape(n)}: reads rendered words {pct(r.get('value'))} (n={r.get('n')}, chance "
        f"{pct(r.get('chance'))})</li>" for n, r in results["legibility"].items()) + "</ul>")
    cols = columns(results)
    rows = []
    for model in results["models"]:
        by = {(c["benchmark"], c["condition"], c["metric"]): c for c in model["cells"]}
        rows.append([model["model"]] + [cell(by[k]) if k in by else "" for k in cols])
    parts.append("<h2>Every model</h2>" + _table(["model"] + [f"{b}/{c} {SHORT[m]}" for b, c, m in cols], rows))
    parts.append("<p class='small'>First judge; accuracy by answer match; 95% bootstrap intervals.</p>")
    spread = spread_table(results, lambda header, rows: _table(header, rows))
    if spread:
        parts.append("<h2>Across seeds</h2><p class='small'>Mean ± standard deviation over the training seeds (one "
                     "row per model and seed above).</p>" + spread)
    held = heldout_table(results, lambda header, rows: _table(header, rows))
    if held:
        parts.append("<h2>Held-out image questions by type</h2>" + held)
    for title, path in plots.items():
        parts.append(f"<h2>{html.escape(title)}</h2>{_image(path)}")
    parts.append("<h2>Examples</h2>" + _table(
        ["model", "benchmark", "condition", "request", "response", "verdict"],
        [[e["model"], e["benchmark"], e["condition"], e["request"][:100], e["response"][:200], e["verdict"]]
         for e in results["examples"][:80]]))
    ran = ran_on(results.get("machines"), results.get("answers_from_cache", ()))
    ran += f"; {evaluated_in(results.get('eval_dtypes'))}"
    parts.append(f"<h2>Lineage</h2><p>Ran on: {html.escape(ran)}.</p>" + _table(
        ["stage", "kind", "inputs", "key", "model sha256", "seconds", "command", "judges"],
        [[r["stage"], r["kind"], ", ".join(r["inputs"]), r["key"], (r["model_sha256"] or "")[:16], r["seconds"],
          r["command"], ", ".join(f"{j['name']} v{j['version']}" for j in r["judges"] or [])]
         for r in results["lineage"]]))
    parts.append("</body></html>")
    return "\n".join(parts)
