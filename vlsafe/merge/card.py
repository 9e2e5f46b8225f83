"""The model card (README.md) of a merged model: the exact config, the inputs' hashes, what happened to the
tensors. Everything in it is also in merge_manifest.json; the card is for people."""

from __future__ import annotations

from vlsafe.merge import config as merge_config


def render(config: merge_config.MergeConfig, manifest: dict) -> str:
    summary = manifest["summary"]
    lines = [
        "---",
        "tags: [merge, vlsafe]",
        "---",
        f"# Merged with vlsafe: {config.merge_method}",
        "",
        f"Output layout `{manifest['output_layout']}` taken from `{config.layout_model}`; "
        f"{summary['output_tensors']} tensors ({summary['merged']} merged, {summary['copied']} copied) in "
        f"{summary['shards']} shard(s), {summary['total_bytes']:,} bytes. "
        "Every tensor's origin is listed in `merge_manifest.json`.",
        "",
        "## Configuration",
        "",
        "```yaml",
        merge_config.dump(config).rstrip(),
        "```",
        "",
        "## Inputs",
        "",
        "| model | layout | file | sha256 |",
        "| --- | --- | --- | --- |",
    ]
    for ref, info in manifest["inputs"].items():
        for name, digest in info["sha256"].items():
            lines.append(f"| `{ref}` | {info['layout']} | {name} | `{digest}` |")
    lines += ["", "## What was done to the tensors", "", "| tensors | what |", "| --- | --- |"]
    for reason, count in sorted(summary["by_reason"].items(), key=lambda item: -item[1]):
        lines.append(f"| {count} | {reason} |")
    if summary["unused_input_tensors"]:
        lines += ["", "Input tensors not used:", ""]
        for ref, reasons in summary["unused_input_tensors"].items():
            for reason, count in reasons.items():
                lines.append(f"- `{ref}`: {count} ({reason})")
    return "\n".join(lines) + "\n"
