"""`vlsafe merge sweep SWEEP.yaml --out DIR`: one merge per point of a grid over a base config, each merged model
evaluated, and the Pareto front of safety, over-refusal and helpfulness.

    config: merge.yaml            # the base config: a path (relative to this file) or an inline mapping
    grid:                         # dotted paths into the config -> values; the grid is their Cartesian product
      merge_method: [task_arithmetic, ties]
      parameters.lambda: [0.5, 1.0]
      models.0.parameters.weight: [0.3, 0.6]
    eval:                         # optional: without it the sweep only merges
      suite: quick                # a suite of `vlsafe eval` (a name, or a .yaml path relative to this file)
      limit: 50                   # at most this many items per benchmark (default: the suite's own sizes)
      conditions: [text, typo]    # default: the suite's
      judges: [default]           # default: the suite's; the first one's verdicts score the points
      corpus: null                # a `vlsafe data synth` corpus, for suites with image questions

Writes, in DIR:
  point-NNN/model/    the merged model (removed after its evaluation with --delete-models; its
                      merge_manifest.json is kept as point-NNN/merge_manifest.json)
  point-NNN/eval/     results.json + samples.jsonl of `vlsafe eval`
  sweep.json          each point's assignment, full config, merge summary and model hash
  pareto.json         each point's settings, model hash, objectives (value, k, n, ci, and the results.json cells
                      they pool) and whether it is on the Pareto front (vlsafe/merge/pareto.py)
  pareto.png          the points and the front
Every point is validated and planned before the first merge runs, and DIR appears only when all are done
(merges are deterministic and generations are cached by model hash, so rerunning an interrupted sweep
regenerates no response it already has).
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from vlsafe.errors import VlsafeError
from vlsafe.io import atomic_dir, write_json
from vlsafe.merge import config as merge_config
from vlsafe.merge import pareto
from vlsafe.merge.engine import DEFAULT_SHARD_SIZE, parse_size, run
from vlsafe.merge.plan import build


class EvalSettings(BaseModel):
    """What `vlsafe eval` runs on every merged model."""
    model_config = ConfigDict(extra="forbid")
    suite: str
    limit: Optional[int] = None
    conditions: Optional[list[str]] = None
    judges: Optional[list[str]] = None  # default: the suite's; the front uses the first
    corpus: Optional[str] = None


def _set(data: dict, path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise VlsafeError(f"{where}: grid path {path!r}: {part!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise VlsafeError(f"{where}: grid path {path!r} runs into a value at {part!r}")


def _spec(sweep_path: Path) -> dict:
    if not sweep_path.is_file():
        raise VlsafeError(f"{sweep_path}: sweep file not found")
    try:
        spec = yaml.safe_load(sweep_path.read_text())
    except yaml.YAMLError as err:
        raise VlsafeError(f"{sweep_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or set(spec) - {"config", "grid", "eval"} or "config" not in spec:
        raise VlsafeError(f"{sweep_path}: a sweep is a mapping with 'config', 'grid' and optionally 'eval'")
    return spec


def points(sweep_path: str | Path) -> tuple[list[dict], Path]:
    """[(assignment, config mapping)] for every grid point, and the folder model paths resolve against."""
    sweep_path = Path(sweep_path)
    spec = _spec(sweep_path)
    base, config_dir = spec["config"], sweep_path.resolve().parent
    if isinstance(base, str):
        base_path = config_dir / base
        if not base_path.is_file():
            raise VlsafeError(f"{sweep_path}: config {base!r} not found")
        base, config_dir = yaml.safe_load(base_path.read_text()), base_path.resolve().parent
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise VlsafeError(f"{sweep_path}: grid maps dotted config paths to non-empty lists of values")
    out = []
    for values in itertools.product(*grid.values()):
        assignment = dict(zip(grid, values))
        data = copy.deepcopy(base)
        for path, value in assignment.items():
            _set(data, path, value, str(sweep_path))
        out.append({"assignment": assignment, "config": data})
    return out, config_dir


def eval_settings(sweep_path: str | Path) -> Optional[EvalSettings]:
    """The sweep's `eval` section (None: merge only), with file paths resolved against the sweep file."""
    sweep_path = Path(sweep_path)
    data = _spec(sweep_path).get("eval")
    if data is None:
        return None
    try:
        settings = EvalSettings.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        raise VlsafeError(f"{sweep_path}: eval.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    here = sweep_path.resolve().parent  # as for models: the working directory first, then the sweep's folder
    if settings.suite.endswith((".yaml", ".yml")) and not Path(settings.suite).is_file():
        settings.suite = str(here / settings.suite)
    if settings.corpus is not None and not Path(settings.corpus).exists():
        settings.corpus = str(here / settings.corpus)
    if settings.limit is not None and settings.limit < 1:
        raise VlsafeError(f"{sweep_path}: eval.limit must be at least 1 (got {settings.limit})")
    from vlsafe.eval.run import load_suite

    load_suite(settings.suite)  # a bad suite fails the sweep before any merge
    return settings


def _evaluate(model: Path, out: Path, settings: EvalSettings, cache: Optional[Path], log: Callable) -> dict:
    """The one call into the evaluation module; returns the objectives read back from the results.json written."""
    from vlsafe.eval.run import evaluate

    evaluate(str(model), settings.suite, out, judges=settings.judges, limit=settings.limit,
             conditions=settings.conditions, corpus=settings.corpus, cache_path=cache, log=log)
    return pareto.objectives(json.loads((out / "results.json").read_text()))


def sweep(sweep_path: str | Path, out: str | Path, shard_size: str | int = DEFAULT_SHARD_SIZE,
          keep_models: bool = True, cache: str | Path | None = None, log: Callable[[str], Any] = print) -> dict:
    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    parse_size(shard_size)
    grid, config_dir = points(sweep_path)
    settings = eval_settings(sweep_path)
    if settings is None and not keep_models:
        raise VlsafeError(f"{sweep_path}: --delete-models needs an 'eval' section (nothing would remain)")
    configs = []
    for i, point in enumerate(grid):
        config = merge_config.parse(point["config"], f"{sweep_path} point {i} {point['assignment']}")
        build(config, config_dir)  # plan every point first: a bad point fails the sweep before any merge
        configs.append(config)
    results = []
    with atomic_dir(out) as tmp:
        for i, (point, config) in enumerate(zip(grid, configs)):
            name = f"point-{i:03d}"
            log(f"{name} ({i + 1}/{len(grid)}): merging {pareto.label(point['assignment'])}")
            model = tmp / name / "model"
            summary = run(config, model, config_dir=config_dir, shard_size=shard_size)
            entry = {"name": name, "assignment": point["assignment"], "label": pareto.label(point["assignment"]),
                     "model_sha256": json.loads((model / "vlsafe.json").read_text())["content_sha256"],
                     "model": f"{name}/model", "config": config.model_dump(mode="json", exclude_defaults=True),
                     "summary": summary}
            if settings is not None:
                entry["results"] = f"{name}/eval/results.json"
                entry["metrics"] = _evaluate(model, tmp / name / "eval", settings, cache,
                                             log=lambda message: log(f"{name}: {message}"))
                if not keep_models:
                    shutil.copy2(model / "merge_manifest.json", tmp / name / "merge_manifest.json")
                    shutil.rmtree(model)
                    entry["model"] = None
            results.append(entry)
        evaluated = settings is not None
        write_json(tmp / "sweep.json", {"format": "vlsafe.merge_sweep/2", "evaluated": evaluated,
                                        "eval": settings.model_dump() if evaluated else None,
                                        "points": [{k: v for k, v in r.items() if k != "metrics"} for r in results]})
        front = []
        if evaluated:
            keys = ("name", "label", "assignment", "model_sha256", "model", "results", "metrics")
            rows = [{key: r[key] for key in keys} for r in results]
            scored = pareto.score(rows)
            front = scored["front"]
            write_json(tmp / "pareto.json", {"format": "vlsafe.merge_pareto/1", "eval": settings.model_dump(),
                                             **scored, "points": rows})
            pareto.plot(rows, tmp / "pareto.png")
    return {"points": len(results), "out": str(out), "evaluated": evaluated, "front": front}
