"""Integrity: every model folder is checked against its recorded content hash before use, cheaply (hashed once,
remembered by path, size and mtime), and the EfficientNet tower is read from safetensors, never a pickle."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from vlsafe import io
from vlsafe.cli import main
from vlsafe.errors import VlsafeError


@pytest.fixture(scope="module")
def pico_vlm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "vlm"
    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(out), "--seed", "1"]) == 0
    return out


def _truncated(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return dst


def _flipped(src: Path, dst: Path) -> Path:
    """One bit changed inside the tensor data: same size, the header still parses."""
    shutil.copytree(src, dst)
    with open(dst / "model.safetensors", "r+b") as handle:
        handle.seek(-64, os.SEEK_END)
        byte = handle.read(1)[0]
        handle.seek(-64, os.SEEK_END)
        handle.write(bytes([byte ^ 0x10]))
    return dst


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_truncated_weights_are_one_line_exit_2_in_chat_and_eval(pico_vlm, tmp_path, capsys):
    bad = _truncated(pico_vlm, tmp_path / "truncated")
    assert main(["chat", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "truncated" in _one_line_error(capsys)
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(bad), "--suite", "quick", "--out", str(out), "--limit", "1",
                 "--cache", str(tmp_path / "c.sqlite")]) == 2
    assert "model.safetensors" in _one_line_error(capsys)
    assert not out.exists()


def test_a_changed_bit_fails_the_recorded_content_hash(pico_vlm, tmp_path, capsys):
    bad = _flipped(pico_vlm, tmp_path / "flipped")
    assert main(["chat", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert "content_sha256" in _one_line_error(capsys)
    # the same folder merged: refused before any tensor is read, nothing written
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(pico_vlm), "parameters": {"weight": 0.5}}, {"model": str(bad), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(config), "--out", str(tmp_path / "merged")]) == 2
    assert "content_sha256" in _one_line_error(capsys)
    assert not (tmp_path / "merged").exists()


def test_merge_outputs_are_checked_too(pico_vlm, tmp_path, capsys):
    other = shutil.copytree(pico_vlm, tmp_path / "other")
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(pico_vlm), "parameters": {"weight": 0.5}}, {"model": str(other), "parameters": {"weight": 0.5}}]}))
    merged = tmp_path / "merged"
    assert main(["merge", str(config), "--out", str(merged)]) == 0
    io.verify_model_dir(merged)  # its recorded hash is the hash of what it wrote
    damaged = _flipped(merged, tmp_path / "merged-damaged")
    with pytest.raises(VlsafeError, match="content_sha256"):
        io.verify_model_dir(damaged)


def test_hashes_are_remembered_by_path_size_and_mtime(pico_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(pico_vlm, copy)
    calls = []
    real = io.sha256_file
    monkeypatch.setattr(io, "sha256_file", lambda path, *a: calls.append(Path(path).name) or real(path, *a))
    io.verify_model_dir(copy)
    assert calls == ["model.safetensors"]
    io.verify_model_dir(copy)
    assert calls == ["model.safetensors"]  # a stat, not a hash
    memo = json.loads((tmp_path / "cache" / io.HASH_MEMO).read_text())
    assert str((copy / "model.safetensors").resolve()) in memo
    stat = (copy / "model.safetensors").stat()
    os.utime(copy / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    io.verify_model_dir(copy)
    assert calls == ["model.safetensors"] * 2  # rewritten (new mtime): hashed again


def test_a_damaged_memo_costs_time_not_correctness(pico_vlm, tmp_path, monkeypatch):
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / io.HASH_MEMO).write_text('{"truncated": [1, 2')
    io.verify_model_dir(pico_vlm)
    assert json.loads((tmp_path / "cache" / io.HASH_MEMO).read_text())


def test_efficientnet_weights_are_converted_once_to_checked_safetensors(tmp_path, monkeypatch):
    import torch

    from vlsafe import assets
    from vlsafe.model import efficientnet

    pth = assets.asset_files("efficientnet-lite0")[0]
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    first = efficientnet.EfficientNetLite0()
    efficientnet.load_imagenet_state(first, pth)
    converted = efficientnet.imagenet_safetensors(pth)
    assert converted.suffix == ".safetensors" and converted.parent == tmp_path / "cache" / "towers"

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called after conversion")

    monkeypatch.setattr(torch, "load", no_pickle)
    second = efficientnet.EfficientNetLite0()
    efficientnet.load_imagenet_state(second, pth)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    # a damaged conversion is noticed by its recorded sha256 and rebuilt from the .pth
    monkeypatch.undo()
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    os.truncate(converted, 1000)
    third = efficientnet.EfficientNetLite0()
    efficientnet.load_imagenet_state(third, pth)
    assert converted.stat().st_size > 1000
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))
