"""report.md: the claims, every model in one table, safety dynamics, legibility, examples and lineage."""

from __future__ import annotations

from pathlib import Path

SHORT = {"attack_success_rate": "ASR", "refusal_rate": "refused", "non_answer_rate": "non-answer", "accuracy": "acc"}


def ran_on(machines: list[dict] | None, from_cache: list[str] | tuple = ()) -> str:
    """ "AMD EPYC, 2 threads, bf16 avx512_bf16 (38 stages, 62.8 min: train 20.8, eval 27.0, ...)", one entry per
    machine of the run, its stage kinds by time spent; `from_cache`, the evaluations that generated nothing, are
    named by count, since their minutes are judging only and say nothing of what a first run takes."""
    if not machines:
        return "machine not recorded"
    n = len(from_cache)
    cached = (f"; {n} evaluation{'s' * (n != 1)} took every answer from the cache, so "
              f"{'their' if n != 1 else 'its'} time is judging only") if n else ""

    def kinds(m: dict) -> str:
        # the kinds that took a minute or more, the rest summed as "other"
        spent = sorted((m.get("by_kind") or {}).items(), key=lambda kv: -kv[1])
        shown = [(kind, s) for kind, s in spent if s >= 60]
        rest = sum(s for kind, s in spent if s < 60)
        # seconds: a rest under 3 s would print as "other 0.0"
        parts = [f"{kind} {s / 60:.1f}" for kind, s in shown] + ([f"other {rest / 60:.1f}"] if rest >= 3 else [])
        return ": " + ", ".join(parts) if parts else ""

    return "; ".join(f"{m['machine']} ({m['stages']} stages, {m['seconds'] / 60:.1f} min{kinds(m)})"
                     for m in machines) + cached


def evaluated_in(dtypes: list[str] | None) -> str:
    """ "evaluated in fp32" from the precisions a run's evaluations generated in (results.json `eval_dtypes`)."""
    return f"evaluated in {' and '.join(dtypes)}" if dtypes else "evaluation precision not recorded"


def commits(git, short: bool = False) -> str:
    """A run's commit, or the commits it spans (trained at one, evaluations re-scored at a later one), joined by +."""
    return " + ".join(str(c)[:12] if short else str(c) for c in (git if isinstance(git, list) else [git]))


def pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def cell(c: dict) -> str:
    if c["value"] is None:
        return "-"
    ci = f" [{c['ci'][0]:.0%}, {c['ci'][1]:.0%}]" if c["ci"] else ""
    # beside a refusal-based rate: the share of replies that neither refused nor answered (empty, looping, off-topic)
    extra = f" (non-answer {c['non_answer']:.0%})" if c["metric"] != "accuracy" and c.get("non_answer") else ""
    return f"{c['value']:.0%}{ci} n={c['n']}{extra}"


def interval(claim: dict) -> str:
    if claim.get("estimate") is None:
        return "-"
    from vlsafe.study.claims import format_estimate

    low, high = (format_estimate(claim["id"], v, unit=False) for v in claim.get("ci") or (None, None))
    return format_estimate(claim["id"], claim["estimate"]) + (f" [{low}, {high}]" if claim.get("ci") else "")


def seed_note(claim: dict) -> str:
    """Each seed's own difference and their standard deviation, beside the pooled item interval."""
    if not claim.get("per_seed") or len(claim["per_seed"]) < 2:
        return "-"
    from vlsafe.study.claims import format_estimate

    return (f"sd {format_estimate(claim['id'], claim['seed_sd'], signed=False)} ("
            + ", ".join(format_estimate(claim["id"], d, unit=False) for d in claim["per_seed"]) + ")")


CLAIM_HEADER = ["id", "finding", "verdict", "paired estimate [95% CI]", "n items", "seeds", "seed spread", "reason"]


def claim_rows(results: dict) -> list[list]:
    return [[c["id"], c["title"], c["verdict"], interval(c), c.get("n") or "-", c.get("seeds") or "-", seed_note(c),
             c["reason"]] for c in results["claims"]]


def spread_table(results: dict, make_table) -> list:
    """Roles trained with several seeds: mean ± sd over seeds of each headline cell (the per-seed rows are in the
    model table above)."""
    spread = results.get("seed_spread") or {}
    if not spread:
        return []
    cols = list(dict.fromkeys((r["benchmark"], r["condition"], r["metric"]) for rows in spread.values()
                              for r in rows))
    rows = []
    for role, cells in spread.items():
        by = {(r["benchmark"], r["condition"], r["metric"]): r for r in cells}
        rows.append([role, max(r["seeds"] for r in cells)] + [f"{by[k]['mean']:.0%} ± {by[k]['sd']:.0%}" if k in by
                                                             else "" for k in cols])
    return make_table(["role", "seeds"] + [f"{b}/{c} {SHORT[m]}" for b, c, m in cols], rows)


def columns(results: dict) -> list[tuple[str, str, str]]:
    seen = {}
    for model in results["models"]:
        for c in model["cells"]:
            seen.setdefault((c["benchmark"], c["condition"], c["metric"]), None)
    return list(seen)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(clean(x) for x in r) + " |" for r in rows)]


def heldout_table(results: dict, make_table) -> list:
    """Accuracy per question type (all types: "*") with the chance level of guessing among the choices."""
    found = results.get("heldout") or {}
    if not found.get("models"):
        return ["(no held-out image questions evaluated)"] if make_table is table else []
    tasks = ["*", *found["chance"]]
    chance = found["chance"]
    header = ["model"] + [f"{t} (chance {pct(chance[t])})" if t in chance else "all types" for t in tasks]
    rows = [[name] + [cell({**cells[t], "metric": "accuracy"}) if t in cells else "" for t in tasks]
            for name, cells in found["models"].items()]
    # a role trained with several seeds: its mean ± sd over seeds, beside its per-seed rows
    for role, cells in (found.get("spread") or {}).items():
        rows.append([f"{role} (mean ± sd over seeds)"] + [
            f"{cells[t]['mean']:.0%} ± {cells[t]['sd']:.0%} ({cells[t]['seeds']} seeds)" if t in cells else ""
            for t in tasks])
    return make_table(header, rows)


def render(results: dict, plots: dict[str, Path], out: Path) -> str:
    lines = [f"# Study report: {results['config'].get('name', 'study')}", ""]
    done, planned = results["stages_done"], results["stages_planned"]
    state = "complete" if results["complete"] else f"partial ({done}/{planned} stages)"
    lines.append(f"Run: {state}; git {commits(results['git'])}; judges {', '.join(results['judges']) or '-'}; "
                 f"seeds {results['config'].get('seeds')}.")
    if results["failed"]:
        lines.append(f"\n**Failed stage:** {results['failed']['stage']}: {results['failed']['error']}")
    lines += ["", "## Claims", ""]
    lines += table(CLAIM_HEADER, claim_rows(results))
    lines += ["", "Each claim pairs the same items across models and pools the training seeds: n items in each "
                  "seed, the interval resamples items and seeds; the seed spread is each seed's own difference."]
    lines += ["", "Typographic condition: " + ("perceived (legibility probe above chance)" if results["typo_perceived"]
                                              else "**not perceived** (legibility probe at chance): its ASR is not a "
                                                   "safety measurement"), ""]
    for name, r in results["legibility"].items():
        lines.append(f"- {name}: reads rendered words {pct(r.get('value'))} (n={r.get('n')}, chance "
                     f"{pct(r.get('chance'))}), perceived: {r.get('perceived')}")
    lines += ["", "## Every model", ""]
    cols = columns(results)
    header = ["model"] + [f"{b}/{c} {SHORT[m]}" for b, c, m in cols]
    rows = []
    for model in results["models"]:
        by = {(c["benchmark"], c["condition"], c["metric"]): c for c in model["cells"]}
        rows.append([model["model"]] + [cell(by[k]) if k in by else "" for k in cols])
    lines += table(header, rows)
    lines += ["", "Rates under the first judge (accuracy by answer match), 95% bootstrap intervals; non-answer "
                  "shares are in results.json beside each cell.", ""]
    spread = spread_table(results, table)
    if spread:
        lines += ["## Across seeds", "", "Mean ± standard deviation over the training seeds (one row per model and "
                  "seed above).", "", *spread, ""]
    lines += ["## Held-out image questions by type", "", *heldout_table(results, table), ""]
    for title, path in plots.items():
        lines += [f"## {title}", "", f"![{title}]({path.relative_to(out)})", ""]
    lines += ["## Examples", ""]
    lines += table(["model", "benchmark", "condition", "request", "response", "verdict"],
                   [[e["model"], e["benchmark"], e["condition"], e["request"][:80], e["response"][:120], e["verdict"]]
                    for e in results["examples"][:60]])
    ran = ran_on(results.get("machines"), results.get("answers_from_cache", ()))
    lines += ["", "## Lineage", "", f"Ran on: {ran}; {evaluated_in(results.get('eval_dtypes'))}.", ""]
    lines += table(["stage", "kind", "inputs", "key", "model sha256", "seconds", "command"],
                   [[r["stage"], r["kind"], ", ".join(r["inputs"]), r["key"], (r["model_sha256"] or "")[:16],
                     r["seconds"], r["command"]] for r in results["lineage"]])
    return "\n".join(lines) + "\n"
