"""The batched generation engine against one plain `model.generate` per prompt, and `vlsafe bench eval`."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from vlsafe import precision
from vlsafe.bench.eval import _naive, _parted
from vlsafe.cli import main
from vlsafe.data.records import Prompt
from vlsafe.eval import generate as generation

QUESTIONS = ["What is 2+2?", "Name a colour.", "Tell me a long story about a dragon and a knight.", "hi",
             "Why is the sky blue? Explain it to a child.", "Translate 'cat' to French.", "List three fruits.",
             "What is the capital of Peru?", "ok", "Write a haiku about rain.", "Spell 'banana' backwards."]


@pytest.fixture(scope="module")
def chatty_pico():
    """Pico with its weights scaled up: a random model that writes varied tokens instead of one repeated newline."""
    from vlsafe.model import checkpoint

    bundle = checkpoint.load("pico")
    with torch.no_grad():
        for name, param in bundle.model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0)
    return bundle


def _varied_stops(bundle, prompts, decoding, monkeypatch) -> None:
    """Makes answers end at different lengths: a token the model writes mid-answer in some rows becomes a stop."""
    plain = generation.generate(bundle, prompts, decoding, batch_size=len(prompts))
    tokenizer = bundle.tokenizer
    counts = Counter(t for text in plain for t in set(tokenizer(text, add_special_tokens=False)["input_ids"][1:8]))
    stop_token = next(t for t, c in counts.most_common() if c < len(prompts))
    monkeypatch.setattr(bundle.model.generation_config, "eos_token_id",
                        [tokenizer.eos_token_id, stop_token])


def test_batched_engine_writes_what_one_generate_per_prompt_writes(chatty_pico, monkeypatch):
    bundle = chatty_pico
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS)]
    decoding = generation.Decoding(max_new_tokens=12)  # > SEGMENT_TOKENS: rows continue from their cache
    _varied_stops(bundle, prompts, decoding, monkeypatch)
    tokenizer = bundle.tokenizer
    merges = []
    real_merge = generation._merge
    monkeypatch.setattr(generation, "_merge", lambda *a: merges.append(1) or real_merge(*a))

    expected = _naive(bundle, prompts, decoding)
    answers = generation.generate(bundle, prompts, decoding, batch_size=4)
    assert answers == expected
    lengths = {len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers}
    assert len(lengths) > 2  # rows stopped at several lengths, so rows left the batch at different segments
    assert merges  # and prompts joined a running batch
    fmt = bundle.formatter()
    shared = generation._shared_prefix([fmt.encode_prompt(p.text).input_ids for p in prompts], None)
    assert tokenizer.decode(shared).endswith("<|im_start|>user\n")  # the chat preamble ran once


def test_rows_last_linear_gives_the_answers_of_plain_linear_and_leaves_training_alone(chatty_pico, monkeypatch):
    """fp32 generation computes few-row linear layers as W @ x.T: the layer's output is F.linear's to fp32 rounding,
    greedy answers are those of the model without it, and with gradients on (training) F.linear runs as before."""
    bundle = chatty_pico
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS)]
    decoding = generation.Decoding(max_new_tokens=12)
    answers = generation.generate(bundle, prompts, decoding, batch_size=4)  # the engine turns it on (fp32, CPU)
    layer = bundle.model.get_output_embeddings()
    assert "forward" in vars(layer)
    real, calls = torch.nn.functional.linear, []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 5, layer.in_features)
    with torch.inference_mode():
        fast = layer(x)
    assert not calls and fast.shape == (3, 5, layer.out_features)
    torch.testing.assert_close(fast, real(x, layer.weight), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # more rows than a decode step has: F.linear
        layer(torch.randn(generation.SKINNY_ROWS + 1, layer.in_features))
    assert len(calls) == 1
    trained = layer(x.requires_grad_())  # gradients on: F.linear, and they flow
    trained.sum().backward()
    assert len(calls) == 2 and x.grad is not None
    monkeypatch.undo()

    generation.rows_last_linear(bundle.model, on=False)
    assert not any("forward" in vars(m) for m in bundle.model.modules() if type(m) is torch.nn.Linear)
    assert _naive(bundle, prompts, decoding) == answers


def test_a_joining_group_that_finishes_in_its_first_segment_leaves_the_running_rows_running(chatty_pico,
                                                                                              monkeypatch):
    # held-out image questions ("It is green.") end within one segment: a whole group of them can join a running
    # batch and finish at once, and the rows already running must still be answered in full
    bundle = chatty_pico
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS)]
    decoding = generation.Decoding(max_new_tokens=20)
    _varied_stops(bundle, prompts, decoding, monkeypatch)
    expected = _naive(bundle, prompts, decoding)
    real_start, real_step = generation._start, generation._step
    groups: list[list[int]] = []

    def start(*args):
        rows = real_start(*args)
        groups.append(list(rows.index))
        rows.joining = len(groups) > 1  # every group after the first joins (or follows) running rows
        return rows

    def step(model, rows, **kwargs):  # a joining group's rows all finish with their first segment
        kept, done = real_step(model, rows, **kwargs)
        if getattr(rows, "joining", False) and kept is not None:
            done.update(zip(kept.index, kept.new))
            return None, done
        return kept, done

    monkeypatch.setattr(generation, "_start", start)
    monkeypatch.setattr(generation, "_step", step)
    answers = generation.generate(bundle, prompts, decoding, batch_size=4)
    assert len(groups) > 1 and all(answers)
    first = groups[0]
    assert [answers[i] for i in first] == [expected[i] for i in first]


def test_a_long_prompt_prefills_apart_from_short_ones_and_answers_stay_those_of_naive(chatty_pico, monkeypatch):
    bundle = chatty_pico
    long_text = "Summarise this text. " + " ".join(f"Line {i} says the weather was fine." for i in range(40))
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS[:8] + [long_text])]
    fmt = bundle.formatter()
    lengths = [len(fmt.encode_prompt(p.text).input_ids) for p in prompts]
    budget = 3 * sorted(lengths)[-2]  # three medium prompts fit, the long one only alone
    monkeypatch.setattr(generation, "PREFILL_TOKENS", budget)
    prefills = []
    real_start = generation._start

    def start(fmt, encoded, index, shared, prefix_cache, pad):
        prefills.append((len(index), max(len(e.input_ids) - len(shared) for e in encoded)))
        return real_start(fmt, encoded, index, shared, prefix_cache, pad)

    monkeypatch.setattr(generation, "_start", start)
    decoding = generation.Decoding(max_new_tokens=12)
    answers = generation.generate(bundle, prompts, decoding, batch_size=len(prompts))
    assert answers == _naive(bundle, prompts, decoding)
    assert sum(rows for rows, _ in prefills) == len(prompts) and len(prefills) > 1
    assert all(rows == 1 or rows * width <= budget for rows, width in prefills)
    assert (1, max(width for _, width in prefills)) in prefills  # the long prompt prefilled alone


def test_prefill_parts_minimise_padding_plus_a_cost_per_part(monkeypatch):
    monkeypatch.setattr(generation, "PREFILL_PART_TOKENS", 256)
    assert generation._prefill_parts([20] * 8) == [8]  # equal lengths: one prefill
    assert generation._prefill_parts([13, 16, 20, 25]) == [4]  # a few padded tokens are not worth a second call
    # the quick study suite's longest group: two medium prompts padded to 532 would waste 768 tokens
    assert generation._prefill_parts([132, 148, 363, 413, 447, 497, 532]) == [2, 5]
    assert generation._prefill_parts([10] * 30 + [600]) == [30, 1]
    assert generation._prefill_parts([]) == [] and generation._prefill_parts([7]) == [1]
    for lengths in ([5, 9, 300, 301, 900], [1, 2, 3, 400, 800, 1200]):  # against every way to cut them
        cost = lambda sizes: sum(k * lengths[sum(sizes[:i + 1]) - 1] + 256 for i, k in enumerate(sizes))
        def splits(n):
            return [[n]] + [[k] + rest for k in range(1, n) for rest in splits(n - k)]
        assert cost(generation._prefill_parts(lengths)) == min(cost(s) for s in splits(len(lengths)))


def test_a_group_of_mixed_lengths_prefills_in_parts_and_decodes_as_one_batch(chatty_pico, monkeypatch):
    """Short prompts and one long one join together: the long one is prefilled apart (one token), then every row
    decodes in one batch; the answers are those of one `generate` per prompt."""
    bundle = chatty_pico
    long_text = "Summarise this text. " + " ".join(f"Line {i} says the weather was fine." for i in range(40))
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS[:8] + [long_text])]
    monkeypatch.setattr(generation, "PREFILL_PART_TOKENS", 16)
    calls = []
    real_step = generation._step

    def step(model, rows, **kwargs):
        calls.append((len(rows.index), kwargs.get("new_tokens", generation.SEGMENT_TOKENS)))
        return real_step(model, rows, **kwargs)

    monkeypatch.setattr(generation, "_step", step)
    decoding = generation.Decoding(max_new_tokens=12)
    answers = generation.generate(bundle, prompts, decoding, batch_size=len(prompts))
    assert answers == _naive(bundle, prompts, decoding)
    prefills = [rows for rows, new in calls if new == 1]
    assert len(prefills) > 1 and sum(prefills) == len(prompts) and 1 in prefills  # the long prompt apart
    assert max(rows for rows, new in calls if new != 1) > max(prefills)  # and then decoded with the others


def test_answers_reach_the_cache_as_they_finish_so_a_killed_run_keeps_them(chatty_pico, tmp_path):
    from vlsafe.eval.cache import Cache

    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS)]
    decoding = generation.Decoding(max_new_tokens=12)
    cache = Cache(tmp_path / "eval.sqlite")
    finished = []

    def progress(n):
        finished.append(n)
        raise KeyboardInterrupt  # killed right after the first answers finished

    with pytest.raises(KeyboardInterrupt):
        generation.generate(chatty_pico, prompts, decoding, batch_size=4, cache=cache, progress=progress)
    kept = cache.get_many(generation.generation_keys(chatty_pico, prompts, decoding))
    assert len(kept) == finished[0] >= 1
    complete = generation.generate(chatty_pico, prompts, decoding, batch_size=4)
    by_key = dict(zip(generation.generation_keys(chatty_pico, prompts, decoding), complete))
    assert all(by_key[key] == text for key, text in kept.items())


def test_sampled_generation_is_reproducible_from_its_seed(chatty_pico):
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS[:5])]
    decoding = generation.Decoding(max_new_tokens=10, do_sample=True, temperature=1.0, seed=3)
    first = generation.generate(chatty_pico, prompts, decoding, batch_size=2)
    assert generation.generate(chatty_pico, prompts, decoding, batch_size=2) == first
    other = generation.generate(chatty_pico, prompts, generation.Decoding(max_new_tokens=10, do_sample=True, seed=4),
                                batch_size=2)
    assert other != first


def test_where_answers_part_the_naive_choice_and_its_lead_over_the_runner_up(chatty_pico):
    bundle = chatty_pico
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS[:3])]
    ids: list[list[int]] = []
    naive = _naive(bundle, prompts, generation.Decoding(max_new_tokens=6), ids)
    assert all(naive) and len(ids) == 3
    tokenizer = bundle.tokenizer
    # the same answer parts nowhere; one that shares the first two tokens' text parts at token 2; an empty one at 0
    shared = tokenizer.decode(ids[1][:2], skip_special_tokens=True).strip()
    assert not naive[1].startswith(shared + "\x00")
    rows = _parted(bundle, prompts, ids, [naive[0], shared + "\x00", ""])
    assert [(r["id"], r["token"]) for r in rows] == [("1", 2), ("2", 0)]
    assert (rows[0]["naive"], rows[0]["batched"]) == (naive[1], shared + "\x00")
    # the greedy choice was the top logit of the same unpadded pass: it leads the runner-up
    assert all(r["lead"] >= 0 for r in rows)


def test_bench_eval_prints_a_table_with_the_cached_pass_utilising_nothing(capsys):
    assert main(["bench", "eval", "--model", "pico", "--n", "3", "--max-new-tokens", "2", "--batch-size", "2",
                 "--threads", "1", "--dtype", "fp32", "--peak-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "3/3 answers identical" in out and "cached" in out


def test_without_native_bf16_the_peak_times_fp32_only_and_mfu_is_taken_against_it(capsys, monkeypatch):
    """Emulated bf16 runs at a few hundredths of fp32 (a 2048 matmul: minutes) and no run uses it there."""
    from vlsafe.bench import limits

    timed = []
    measure = limits.matmul_peak
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(limits, "matmul_peak", lambda dtype, *a, **k: timed.append(dtype) or measure(dtype, *a, **k))
    assert main(["bench", "eval", "--model", "pico", "--n", "2", "--max-new-tokens", "2", "--batch-size", "2",
                 "--peak-size", "64"]) == 0
    assert timed == [torch.float32]
    assert "no native bf16: MFU against fp32" in " ".join(capsys.readouterr().out.split())  # the title wraps
    peak = limits.peaks(64, 0.01)
    assert peak["bf16_flops"] is None and limits.peak_flops(peak) == peak["fp32_flops"] > 0
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    peak = limits.peaks(64, 0.01)
    assert peak["mfu_against"] == "bf16" and limits.peak_flops(peak) == peak["bf16_flops"] > 0


def test_bench_eval_reports_the_rerun_generating_nothing(capsys):
    threads = torch.get_num_threads()
    assert main(["bench", "eval", "--model", "pico", "--n", "5", "--max-new-tokens", "3", "--batch-size", "2",
                 "--threads", "1", "--dtype", "fp32", "--peak-size", "64", "--json"]) == 0
    assert torch.get_num_threads() == threads  # the bench leaves the process as it found it
    report = json.loads(capsys.readouterr().out)
    modes = report["modes"]
    assert report["threads"] == 1 and report["batch_size"] == 2 and report["n"] == 5
    assert [modes[m]["generated"] for m in ("naive", "batched", "cached")] == [5, 5, 0]
    assert modes["cached"]["new_tokens"] == modes["batched"]["new_tokens"]
    assert report["same_text_naive_vs_batched"] == 5 and report["parted"] == []
    assert report["precision"] == "fp32" and report["peak"]["fp32_flops"] > 0
    assert report["peak"]["mfu_against"] == ("bf16" if precision.cpu_has_bf16() else "fp32")
    naive, batched = modes["naive"]["tokens_per_s"], modes["batched"]["tokens_per_s"]
    assert report["ratio"] == (pytest.approx(batched / naive, rel=1e-2) if naive else None)
    assert modes["cached"]["mfu"] is None  # the cached pass computed nothing
    peak = report["peak"][f"{report['peak']['mfu_against']}_flops"]
    for mode in (modes["naive"], modes["batched"]):  # MFU = new tokens/s x 2 x params / bf16 (native) or fp32 peak
        assert mode["precision"] == "fp32"
        assert mode["mfu"] == pytest.approx(mode["tokens_per_s"] * report["flops_per_token"] / peak, rel=1e-2,
                                            abs=1e-4)


def test_a_vlm_never_emits_its_image_placeholder(tmp_path):
    """Stage 2 can give the new <image> row of tied embeddings a high logit; generating it would feed the model an
    image token without an image. The engine suppresses it (and says nothing is wrong)."""
    from vlsafe.model import checkpoint

    assert main(["build", "--llm", "pico", "--tower", "pico", "--out", str(tmp_path / "vlm")]) == 0
    bundle = checkpoint.load(str(tmp_path / "vlm"))
    image_id = bundle.formatter().image_token_id
    with torch.no_grad():  # make the placeholder the greedy choice everywhere
        bundle.model.get_output_embeddings().weight[image_id] *= 1000
    prompts = [Prompt(id=str(i), text=f"Say something about {i}.") for i in range(3)]
    answers = generation.generate(bundle, prompts, generation.Decoding(max_new_tokens=4), batch_size=3)
    assert len(answers) == 3
    naive = _naive(bundle, prompts, generation.Decoding(max_new_tokens=4))
    assert answers == naive


def _chatty(bundle):
    with torch.no_grad():
        for name, param in bundle.model.named_parameters():
            if "norm" not in name:
                param.mul_(8.0)
    return bundle


def test_bf16_batched_engine_writes_what_naive_bf16_writes_and_never_shares_fp32_cache(tmp_path):
    from vlsafe.eval.cache import Cache
    from vlsafe.model import checkpoint

    bundle = _chatty(checkpoint.load("pico"))
    prompts = [Prompt(id=str(i), text=t) for i, t in enumerate(QUESTIONS)]
    fp32, bf16 = generation.Decoding(max_new_tokens=12), generation.Decoding(max_new_tokens=12, dtype="bf16")
    fp32_keys = generation.generation_keys(bundle, prompts, fp32)
    assert set(fp32_keys).isdisjoint(generation.generation_keys(bundle, prompts, bf16))
    assert "dtype" not in fp32.key()  # fp32 keys are those written before precision was a setting

    cache = Cache(tmp_path / "gen.sqlite")
    batched = generation.generate(bundle, prompts, bf16, batch_size=4, cache=cache)  # > SEGMENT_TOKENS: continues
    assert next(bundle.model.parameters()).dtype == torch.bfloat16
    assert batched == _naive(bundle, prompts, bf16)  # both in bf16: the same greedy answers
    assert cache.misses == len(prompts)
    generation.generate(bundle, prompts, fp32, batch_size=4, cache=cache)  # fp32 never reads bf16 answers
    assert cache.misses == 2 * len(prompts)
    assert next(bundle.model.parameters()).dtype == torch.float32
    cache.close()


def test_eval_records_its_precision_and_refuses_one_it_cannot_run(tmp_path, capsys, monkeypatch):
    from vlsafe import precision

    suite = tmp_path / "tiny.yaml"
    suite.write_text("description: test\nseed: 0\nmax_new_tokens: 3\nentries:\n"
                     "  - {benchmark: harmbench, sample: 3, conditions: [text]}\n")
    base = ["eval", "--model", "pico", "--suite", str(suite), "--cache", str(tmp_path / "c.sqlite"),
            "--judge", "refusal-patterns"]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    for flag, resolved in (("auto", "bf16"), ("fp32", "fp32")):
        assert main([*base, "--dtype", flag, "--out", str(tmp_path / flag)]) == 0
        report = json.loads((tmp_path / flag / "results.json").read_text())
        assert (report["config"]["dtype"], report["decoding"]["dtype"]) == (flag, resolved)
        assert report["cache"]["generation_misses"] == 3  # the fp32 run shares nothing with the bf16 one
    assert main([*base, "--out", str(tmp_path / "default")]) == 0  # no flag: fp32, bf16 only when asked
    report = json.loads((tmp_path / "default" / "results.json").read_text())
    assert report["decoding"]["dtype"] == "fp32" and report["cache"]["generation_hits"] == 3
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    for flag, message in (("bf16", "no native bf16"), ("fp16", "not an evaluation precision")):
        assert main([*base, "--dtype", flag, "--out", str(tmp_path / flag)]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / flag).exists()
