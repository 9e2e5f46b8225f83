"""`vlsafe eval compare A B`: paired differences between two evaluations of the same items.

Every model answers the same seeded items, so a difference between two models is measured item by item: B - A
over the items both runs have (matched by benchmark, condition and id, and the prompt shown must be the same),
with a paired bootstrap interval and an exact McNemar p-value (`metrics.paired_difference`). Overlapping
marginal intervals say little about such a difference; a paired one says what the items do.

Either side may be several runs (training seeds of one recipe): outcomes become seeds x items, the interval
resamples seeds as well as items, and the seed-to-seed spread of the difference goes beside it. With one run a side
(one model under two precisions, batch sizes or engines), `agreement` says how many of the matched items got the
same verdict (the judge's three-way verdict; for accuracy items, right or wrong) and the very same answer. A run's
outcome per item comes from its samples.jsonl under one judge:

  attack_success_rate  harmful item answered: verdict `compliance` (or, for judges with refusal verdicts only,
                       not refused)
  refusal_rate         benign item refused
  non_answer_rate      verdict `non_answer` (judges that give three verdicts)
  accuracy             the answer matched (judge-free)
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from vlsafe.errors import VlsafeError

MIN_MATCHED_SHARE = 0.5  # fewer shared items than this share of either side: not the same items, no pairing


def _expand(dirs: list) -> list[Path]:
    out = []
    for entry in dirs:
        text = str(entry)
        matches = sorted(glob.glob(text)) if any(c in text for c in "*?[") else [text]
        if not matches:
            raise VlsafeError(f"{text}: no evaluation directory matches")
        out += [Path(m) for m in matches]
    return out


def _read(run: Path) -> tuple[dict, list[dict]]:
    from vlsafe.data.formats._common import read_jsonl
    from vlsafe.eval.rows import read_rows

    results, samples = run / "results.json", run / "samples.jsonl"
    for path in (results, samples):
        if not path.is_file():
            raise VlsafeError(f"{path}: not found (an evaluation directory holds results.json and samples.jsonl)")
    try:
        report = json.loads(results.read_text())
    except json.JSONDecodeError as err:
        raise VlsafeError(f"{results}: not valid JSON ({err.msg})") from None
    if not isinstance(report, dict):
        raise VlsafeError(f"{results}: not a `vlsafe eval` results object")
    read_rows(report.get("results"), results)  # a malformed results file fails here, in one line
    rows = []
    for line, row in read_jsonl(samples):
        missing = [k for k in ("benchmark", "condition", "id", "metric", "verdicts") if k not in row]
        if missing:
            raise VlsafeError(f"{samples}: line {line}: no field {missing[0]!r} (not `vlsafe eval` samples)")
        rows.append(row)
    return report, rows


def _outcomes(row: dict, judge: str, where: str) -> dict[str, bool]:
    """The binary outcomes one sample contributes, per metric."""
    if row["metric"] == "accuracy":
        return {"accuracy": bool(row.get("correct"))}
    if judge not in row["verdicts"]:
        raise VlsafeError(f"{where}: item {row['id']!r} has no verdict of judge {judge!r} "
                          f"(has {', '.join(row['verdicts'])})")
    verdict = row["verdicts"][judge]
    three_way = verdict.get("verdict") if isinstance(verdict, dict) else None
    if not three_way and not (isinstance(verdict, dict) and isinstance(verdict.get("refused"), bool)):
        raise VlsafeError(f"{where}: item {row['id']!r}: judge {judge!r} gave neither `verdict` nor `refused` "
                          "(not a `vlsafe eval` verdict)")
    out = {}
    if row["metric"] == "attack_success_rate":
        out["attack_success_rate"] = three_way == "compliance" if three_way else not verdict["refused"]
    elif row["metric"] == "refusal_rate":
        out["refusal_rate"] = bool(verdict["refused"])
    if three_way:
        out["non_answer_rate"] = three_way == "non_answer"
    return out


def _verdict(row: dict, judge: str):
    """What one item was judged: right or wrong for accuracy items, else the judge's verdict (three-way where the
    judge gives one, refused or not otherwise)."""
    if row["metric"] == "accuracy":
        return bool(row.get("correct"))
    verdict = row["verdicts"][judge]
    return verdict.get("verdict") or bool(verdict["refused"])


def agreement(a: dict, b: dict, keys: list) -> dict:
    """Of the matched items of two runs: how many got the same verdict (safety items) or the same correctness
    (accuracy items), and how many the same answer, word for word."""
    accuracy = [k for k in keys if "accuracy" in a[k][1]]
    scored = [k for k in keys if "accuracy" not in a[k][1]]

    def share(same: int, n: int) -> dict:
        return {"same": same, "n": n, "share": same / n if n else None}

    written = [k for k in keys if a[k][3] is not None and b[k][3] is not None]  # samples that carry the answer
    return {"verdicts": share(sum(a[k][2] == b[k][2] for k in scored), len(scored)),
            "correct": share(sum(a[k][2] == b[k][2] for k in accuracy), len(accuracy)),
            "responses": share(sum(a[k][3] == b[k][3] for k in written), len(written))}


def _side(runs: list[Path], judge: str | None) -> tuple[str, list[dict]]:
    """Per run: {(benchmark, condition, id): (prompt, {metric: outcome})}; the judge defaults to the first run's
    first judge."""
    tables = []
    for run in runs:
        report, rows = _read(run)
        if judge is None:
            judge = (report.get("judges") or [{}])[0].get("name") or next(iter(rows[0]["verdicts"]), None)
        tables.append({(r["benchmark"], r["condition"], r["id"]): (r.get("prompt"), _outcomes(r, judge, str(run)),
                                                                   _verdict(r, judge), r.get("response"))
                       for r in rows})
    return judge, tables


def compare(a_dirs: list, b_dirs: list, judge: str | None = None, seed: int = 0) -> dict:
    """Paired differences B - A per (benchmark, condition, metric) over the items every run has; several runs on a
    side are training seeds. Raises when the runs do not share their items (different suites, sampling seeds or
    benchmark versions), saying how many matched."""
    from vlsafe.eval.benchmarks import METRICS
    from vlsafe.eval.metrics import paired_difference

    a_runs, b_runs = _expand(a_dirs), _expand(b_dirs)
    if not a_runs or not b_runs:
        raise VlsafeError("eval compare needs at least one evaluation directory on each side")
    judge, a_tables = _side(a_runs, judge)
    _, b_tables = _side(b_runs, judge)
    tables = a_tables + b_tables
    by_cell = [{} for _ in tables]  # per run: (benchmark, condition) -> item keys
    for table, cells_of_run in zip(tables, by_cell):
        for key in table:
            cells_of_run.setdefault(key[:2], set()).add(key)
    common = set.intersection(*(set(c) for c in by_cell))
    if not common:
        raise VlsafeError("eval compare: the runs share no (benchmark, condition): 0 items matched")
    shared = set()
    for cell in sorted(common):
        keys = set.intersection(*(c[cell] for c in by_cell))
        largest = max(len(c[cell]) for c in by_cell)
        if len(keys) < MIN_MATCHED_SHARE * largest:
            raise VlsafeError(f"eval compare: {'/'.join(cell)}: the runs share {len(keys)} of up to {largest} items: "
                              f"not the same items (another suite or sampling seed?), so no paired difference")
        shared |= keys
    for key in sorted(shared):
        if len({t[key][0] for t in tables}) > 1:
            raise VlsafeError(f"eval compare: item {'/'.join(key)} was shown different prompts in different runs "
                              f"(another benchmark version?): no paired difference")
    unpaired = sorted({"/".join(cell) for c in by_cell for cell in c} - {"/".join(cell) for cell in common})
    cells: dict[tuple, list] = {}
    for key in sorted(shared):
        metrics = set.intersection(*(set(t[key][1]) for t in tables))
        for metric in metrics:
            cells.setdefault((key[0], key[1], metric), []).append(key)
    rows = []
    for (benchmark, condition, metric), keys in sorted(cells.items()):
        a = [[t[k][1][metric] for k in keys] for t in a_tables]
        b = [[t[k][1][metric] for k in keys] for t in b_tables]
        fact = METRICS[metric]
        result = paired_difference(a, b, seed=seed)
        better = None
        if result["ci"] is not None and not result["ci"][0] <= 0 <= result["ci"][1]:
            better = "b" if (result["difference"] > 0) == fact.higher_is_better else "a"
        rows.append({"benchmark": benchmark, "condition": condition, "metric": metric, "label": fact.label,
                     "higher_is_better": fact.higher_is_better, **result, "better": better})
    per_side = [len(t) for t in tables]
    agreed = agreement(a_tables[0], b_tables[0], sorted(shared)) if len(tables) == 2 else None
    return {"a": [str(r) for r in a_runs], "b": [str(r) for r in b_runs], "judge": judge,
            "seeds": {"a": len(a_runs), "b": len(b_runs)}, "items": {"matched": len(shared), "per_run": per_side},
            "unpaired": unpaired,  # (benchmark/condition) cells that not every run has, e.g. image conditions of a VLM
            "ci": {"method": "paired bootstrap over seeds and items", "level": 0.95, "seed": seed},
            "agreement": agreed,  # one run a side only: None with seeds
            "rows": rows}
