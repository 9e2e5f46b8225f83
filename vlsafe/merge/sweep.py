"""`vlsafe merge sweep SWEEP.yaml --out DIR`: one merge per point of a grid over a base config.

    config: merge.yaml            # the base config: a path (relative to this file) or an inline mapping
    grid:                         # dotted paths into the config -> values; the grid is their Cartesian product
      merge_method: [task_arithmetic, ties]
      parameters.lambda: [0.5, 1.0]
      models.0.parameters.weight: [0.3, 0.6]

Writes DIR/point-NNN/ (a merged model each) and DIR/sweep.json (each point's assignment, full config and merge
summary). Every point is validated and planned before the first merge runs, and DIR appears only when all are
done. Evaluation does not exist yet, so points are not scored: sweep.json says `"evaluated": false`, and the
Pareto front over safety, over-refusal and helpfulness waits for the evaluation suite.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import yaml

from vlsafe.errors import VlsafeError
from vlsafe.io import atomic_dir, write_json
from vlsafe.merge import config as merge_config
from vlsafe.merge.engine import DEFAULT_SHARD_SIZE, parse_size, run
from vlsafe.merge.plan import build


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


def points(sweep_path: str | Path) -> tuple[list[dict], Path]:
    """[(assignment, config mapping)] for every grid point, and the folder model paths resolve against."""
    sweep_path = Path(sweep_path)
    if not sweep_path.is_file():
        raise VlsafeError(f"{sweep_path}: sweep file not found")
    try:
        spec = yaml.safe_load(sweep_path.read_text())
    except yaml.YAMLError as err:
        raise VlsafeError(f"{sweep_path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(spec, dict) or set(spec) - {"config", "grid"} or "config" not in spec:
        raise VlsafeError(f"{sweep_path}: a sweep is a mapping with 'config' and 'grid'")
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


def sweep(sweep_path: str | Path, out: str | Path, shard_size: str | int = DEFAULT_SHARD_SIZE) -> dict:
    out = Path(out)
    if out.exists():
        raise VlsafeError(f"{out}: output path exists (choose a new one)")
    parse_size(shard_size)
    grid, config_dir = points(sweep_path)
    configs = []
    for i, point in enumerate(grid):
        config = merge_config.parse(point["config"], f"{sweep_path} point {i} {point['assignment']}")
        build(config, config_dir)  # plan every point first: a bad point fails the sweep before any merge
        configs.append(config)
    results = []
    with atomic_dir(out) as tmp:
        for i, (point, config) in enumerate(zip(grid, configs)):
            name = f"point-{i:03d}"
            summary = run(config, tmp / name, config_dir=config_dir, shard_size=shard_size)
            results.append({"name": name, "assignment": point["assignment"],
                            "config": config.model_dump(mode="json", exclude_defaults=True), "summary": summary})
        report = {"format": "vlsafe.merge_sweep/1", "points": results, "evaluated": False,
                  "note": "evaluation is not available yet: no scores and no Pareto front"}
        write_json(tmp / "sweep.json", report)
    return {"points": len(results), "out": str(out), "evaluated": False}
