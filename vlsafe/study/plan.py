"""From a `StudyConfig` to the DAG of stages (no work done): the paper's experiment as data.

    [align-data -> align]  the base LLM made safe first, unless it is already (`align`)
    vlm0 -> stage1 -> stage2-sS (checkpoints)       VL adaptation, one run per seed S
    control-data -> control-sS                      the aligned LLM fine-tuned on the same instructions, text only
    vlguard-like -> safety_sft-sS, mixed-sS         remedies: post-hoc safety SFT, safety data mixed into stage 2
    pairs-sS -> dpo-sS                              remedy: DPO on on-policy pairs from the adapted VLM
    merge-M-P-W-sS                                  adapted VLM merged with partner P by method M at weight W
    legibility-adapted-sS                           can the VLM read rendered text (gates the typo condition)
    eval-MODEL                                      `vlsafe eval` of every model and stage-2 checkpoint
    analysis                                        layer analysis (`analysis: true`)

Model names (what the report and claims call them): llm (the base, when it is aligned here), aligned, vlm1 (after
stage 1: step 0 of stage 2), adapted-sS, adapted-sS-stepN, control-sS, safety_sft-sS, mixed-sS, dpo-sS, merges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vlsafe.errors import VlsafeError
from vlsafe.study.config import CostModel, StudyConfig
from vlsafe.study.dag import Dag, Stage
from vlsafe.study.stages import ref

TRAIN_STAGE = {"align": "align", "stage1": "projector", "stage2": "full", "control": "align",
               "safety_sft": "safety-sft", "mixed": "mixed", "dpo": "dpo"}
TA_FAMILY = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties")


@dataclass
class Plan:
    dag: Dag
    models: dict[str, dict] = field(default_factory=dict)  # model name -> {stage, ref, role, seed, step, ...}
    missing: list[str] = field(default_factory=list)  # one line per input that is not there
    unrunnable: list[str] = field(default_factory=list)  # one line per precision this machine cannot run
    suite: dict = field(default_factory=dict)
    cost_note: str = ""  # how the estimates were scaled to this machine and LLM (vlsafe/study/run.py)


# ------------------------------------------------------------------------------------------------- input checks
def check_model_spec(spec: str, kind: str) -> str | None:
    """None when the model can be loaded here; else one line saying what is missing."""
    from vlsafe import assets

    if spec == "pico":
        return None
    names = {a.name: a for a in assets.list_assets()}
    if spec in names:
        failures = [c for c in assets.verify(spec) if c.status != "ok"]
        return f"{kind} {spec!r}: asset not installed or damaged (vlsafe assets fetch {spec})" if failures else None
    path = Path(spec)
    if path.exists():
        return None
    if path.suffix == ".gguf" or spec.startswith((".", "/")) or "/" not in spec:
        return f"{kind} {spec!r}: not found (a preset of `vlsafe assets list`, 'pico', a local folder or a hub id)"
    try:  # a hub id: usable offline only when already in the local hub cache
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return None
    except Exception:  # noqa: BLE001 - no cache or a malformed id: not available either way
        pass
    return f"{kind} {spec!r}: hub id not in the local cache and the hub is not reachable (download it first)"


def _train_settings(config: StudyConfig, arm: str, where: str) -> dict:
    from vlsafe.config import validate
    from vlsafe.train.config import TrainConfig

    settings = config.arm(arm)
    accelerate = settings.get("accelerate")
    probe = {k: v for k, v in settings.items() if k != "accelerate"}
    for key in ("stage", "model", "data", "out"):
        if key in probe:
            raise VlsafeError(f"{where}: train.{arm}.{key} is set by the study, not the profile")
    data = [{"path": "-", "role": "task"}, {"path": "-", "role": "safety"}] if arm == "mixed" else ["-"]
    validate(TrainConfig, {"stage": TRAIN_STAGE[arm], "model": "-", "data": data, "out": "-", **probe},
             f"{where}: train.{arm}")
    if accelerate is not None and not Path(accelerate).is_file():
        raise VlsafeError(f"{where}: train.{arm}.accelerate: {accelerate}: accelerate config not found")
    return settings


def _precision(name: str) -> tuple[str, str | None]:
    """(the precision a training stage runs in on this machine, None) or (name, why it cannot run here).

    `auto` is made concrete here, so a stage's key and its train.yaml say what it computes: bf16 on hardware with
    native bf16, fp32 elsewhere (a stage trained in bf16 is not reused by a study that would train in fp32)."""
    from vlsafe import precision

    try:
        return precision.resolve(name, precision.device_type()), None
    except VlsafeError as err:
        return name, str(err)


def suite_for(config: StudyConfig, where: str) -> tuple[str, dict]:
    """The eval suite with the study's sizes, length and seed applied (a benchmark's metric says if it is harmful)."""
    from vlsafe.eval.benchmarks import BENCHMARKS
    from vlsafe.eval.run import load_suite

    name, spec = load_suite(config.eval.suite)
    suite = spec.model_dump()
    for entry in suite["entries"]:
        registered = BENCHMARKS.get(entry["benchmark"])
        if registered is None:  # heldout: the corpus's image questions
            entry["sample"] = config.eval.n_heldout or entry["sample"]
            continue
        n = config.eval.n_harmful if registered.metric == "attack_success_rate" else config.eval.n_benign
        entry["sample"] = entry["sample"] if n is None else n
    suite["description"] += f" [as run by the study {config.name!r}]"
    suite["max_new_tokens"] = config.eval.max_new_tokens or suite["max_new_tokens"]
    if config.eval.judges:
        suite["judges"] = list(config.eval.judges)
    return name, suite


# ----------------------------------------------------------------------------------------------------- costs
def machine_costs(config: StudyConfig) -> tuple[CostModel, float | None, str, float | None]:
    """The cost constants for this machine (its training precision picks the set), their reference peak, the
    precision that peak is measured in and the parameters per token of the LLM they were measured with."""
    from vlsafe import precision

    return config.cost.on_machine(precision.resolve("auto", precision.device_type()))


def _train_cost(config: StudyConfig, settings: dict, arm: str, records: int) -> float:
    c = machine_costs(config)[0]
    steps = settings.get("max_steps") or settings.get("epochs", 1) * max(1, records // settings["batch_size"])
    per_token = c.projector_token_s if arm == "stage1" else c.train_token_s
    factor = 2.5 if arm == "dpo" else 1.0  # chosen + rejected, plus the reference pass before step 1
    return c.fixed_s + steps * settings["batch_size"] * c.tokens_per_example * per_token * factor


def _eval_items(suite: dict, is_vlm: bool, heldout: int) -> int:
    total = 0
    for entry in suite["entries"]:
        conditions = entry["conditions"] if is_vlm else [c for c in entry["conditions"] if c == "text"]
        n = entry["sample"] or (heldout if entry["benchmark"] == "heldout" else 100)
        if entry["benchmark"] == "heldout" and not is_vlm:
            continue
        total += n * len(conditions)
    return total


# ------------------------------------------------------------------------------------------------------- plan
def build_plan(config: StudyConfig, where: str = "study") -> Plan:
    """Every stage with its config, inputs and estimated cost; `missing` lists the inputs that are not here."""
    dag = Dag()
    plan = Plan(dag)
    c = machine_costs(config)[0]
    seeds = config.seeds
    first = seeds[0]
    from vlsafe.model.towers import check_builtin_layer

    if line := check_builtin_layer(config.tower, config.tower_feature_layer):
        plan.missing.append(f"tower_feature_layer: {line}")
    for spec, kind in ((config.llm, "llm"), (config.tower, "tower")):
        line = check_model_spec(spec, kind)
        if line:
            plan.missing.append(line)
    for name, data in config.data.model_dump().items():
        if data is not None and not Path(data["path"]).exists():
            plan.missing.append(f"data.{name}: {data['path']}: file not found")
    suite_name, suite = suite_for(config, where)
    plan.suite = suite
    heldout = max(60, config.corpus.n // 10)
    gen = lambda items, tokens: c.fixed_s + items * tokens * c.generate_token_s  # noqa: E731
    model_files = lambda spec: [spec] if Path(spec).exists() else []  # noqa: E731
    model_specs = lambda spec: [] if Path(spec).exists() else [spec]  # noqa: E731

    def external(name: str, fallback: dict) -> dict:
        data = getattr(config.data, name)
        return data.model_dump() if data is not None else fallback

    def add_model(name: str, stage: str, model_ref: str, role: str, seed: int | None = None, **extra):
        plan.models[name] = {"stage": stage, "ref": model_ref, "role": role, "seed": seed, **extra}

    def add_train(name: str, arm: str, model_ref: str, data: list[dict], seed: int, inputs: list[str],
                  records: int) -> Stage:
        settings = _train_settings(config, arm, where)
        dtype, problem = _precision(settings.get("dtype", "auto"))
        if problem and f"train.{arm}.dtype: {problem}" not in plan.unrunnable:
            plan.unrunnable.append(f"train.{arm}.dtype: {problem}")
        train = {"stage": TRAIN_STAGE[arm], "model": model_ref, "data": data, **settings, "dtype": dtype,
                 "seed": seed}
        files = [d["path"] for d in data if not d["path"].startswith("@")]
        return dag.add(Stage(name, "train", {"train": train}, inputs=inputs, files=files,
                             models=[] if model_ref.startswith("@") else model_specs(model_ref),
                             cost_s=_train_cost(config, settings, arm, records),
                             command=f"vlsafe train stages/{name}/train.yaml"))

    # --- data the study writes itself (or the external files that replace it)
    dag.add(Stage("corpus", "corpus", config.corpus.model_dump(),
                  cost_s=c.fixed_s + (config.corpus.n * 1.1 + heldout) * c.image_s,
                  command=f"vlsafe data synth --out stages/corpus/corpus --n {config.corpus.n} "
                          f"--seed {config.corpus.seed}"))
    corpus = ref("corpus", "corpus")
    stage1_data = external("stage1", {"path": ref("corpus", "corpus", "stage1_captions.json"), "format": "llava"})
    stage2_data = external("stage2", {"path": ref("corpus", "corpus", "stage2_instruct.json"), "format": "llava"})
    data_inputs = lambda d: ["corpus"] if d["path"].startswith("@") else []  # noqa: E731

    # --- the aligned LLM
    if config.aligns():
        if config.data.align is None:
            dag.add(Stage("align-data", "align-data", {"model": config.llm, **config.align_data.model_dump(),
                                                       "seed": first},
                          models=model_specs(config.llm), files=model_files(config.llm),
                          cost_s=gen(300, config.align_data.max_new_tokens),
                          command=f"vlsafe safety align-data --model {config.llm} --out stages/align-data/data "
                                  f"--n-harmful {config.align_data.n_harmful}"))
            align_data = {"path": ref("align-data", "data"), "format": "jsonl"}
        else:
            align_data = config.data.align.model_dump()
        add_train("align", "align", config.llm, [align_data], first,
                  ["align-data"] if align_data["path"].startswith("@") else [], config.align_data.n_harmful * 2)
        aligned = ref("align", "model")
        add_model("llm", "", config.llm, "base LLM (not safety-aligned)")
        add_model("aligned", "align", aligned, "aligned LLM")
    else:
        aligned = config.llm
        add_model("aligned", "", config.llm, "aligned LLM (as shipped)")

    # --- VL adaptation
    # the feature layer joins the stage's config only when set, so a study that never names one keeps its keys
    layer = {} if config.tower_feature_layer is None else {"feature_layer": config.tower_feature_layer}
    dag.add(Stage("vlm0", "build", {"llm": aligned, "tower": config.tower, "seed": first, **layer},
                  inputs=["align"] if config.aligns() else [], models=[config.tower] + (
                      [] if config.aligns() else model_specs(config.llm)),
                  files=[] if config.aligns() else model_files(config.llm), cost_s=c.fixed_s * 3,
                  command=f"vlsafe build --llm {aligned} --tower {config.tower}"
                          + "".join(f" --feature-layer {v}" for v in layer.values()) + " --out stages/vlm0/model"))
    add_train("stage1", "stage1", ref("vlm0", "model"), [stage1_data], first, ["vlm0", *data_inputs(stage1_data)],
              config.corpus.n)
    add_model("vlm1", "stage1", ref("stage1", "model"), "VLM after stage 1 (stage 2 at step 0)", step=0)
    stage2 = config.arm("stage2")
    for s in seeds:
        add_train(f"stage2-s{s}", "stage2", ref("stage1", "model"), [stage2_data], s,
                  ["stage1", *data_inputs(stage2_data)], config.corpus.n)
        add_model(f"adapted-s{s}", f"stage2-s{s}", ref(f"stage2-s{s}", "model"), "adapted VLM", s,
                  step=stage2.get("max_steps"))
        every, total = stage2.get("save_every", 0), stage2.get("max_steps")
        wanted = config.eval.checkpoints is True or (config.eval.checkpoints == "first_seed" and s == first)
        if wanted and every and total:
            for step in range(every, total, every):
                add_model(f"adapted-s{s}-step{step}", f"stage2-s{s}",
                          ref(f"stage2-s{s}", "run", f"checkpoints/step-{step}"), "stage-2 checkpoint", s, step=step)

    # --- the control arm and the remedies
    if "control" in config.arms:
        dag.add(Stage("control-data", "control-data", {"data": stage2_data}, inputs=data_inputs(stage2_data),
                      cost_s=c.fixed_s, command="(stage-2 conversations with the image dropped)"))
        for s in seeds:
            add_train(f"control-s{s}", "control", aligned, [{"path": ref("control-data", "data"), "format": "jsonl"}],
                      s, ["control-data", *(["align"] if config.aligns() else [])], config.corpus.n)
            add_model(f"control-s{s}", f"control-s{s}", ref(f"control-s{s}", "model"),
                      "control: text-only fine-tune", s)
    if {"safety_sft", "mixed"} & set(config.arms):
        if config.data.safety is None:
            dag.add(Stage("vlguard-like", "vlguard-like", {"corpus": corpus, **config.vlguard_like.model_dump(),
                                                           "seed": first}, inputs=["corpus"], cost_s=c.fixed_s * 2,
                          command=f"vlsafe safety vlguard-like --corpus stages/corpus/corpus --out "
                                  f"stages/vlguard-like/data --n {config.vlguard_like.n}"))
            safety = {"path": ref("vlguard-like", "data"), "format": "vlguard"}
        else:
            safety = config.data.safety.model_dump()
        safety_inputs = ["vlguard-like"] if safety["path"].startswith("@") else []
        for s in seeds:
            if "safety_sft" in config.arms:
                add_train(f"safety_sft-s{s}", "safety_sft", ref(f"stage2-s{s}", "model"),
                          [{**safety, "role": "safety"}], s, [f"stage2-s{s}", *safety_inputs], config.vlguard_like.n)
                add_model(f"safety_sft-s{s}", f"safety_sft-s{s}", ref(f"safety_sft-s{s}", "model"),
                          "remedy: safety SFT after adaptation", s)
            if "mixed" in config.arms:
                add_train(f"mixed-s{s}", "mixed", ref("stage1", "model"),
                          [{**stage2_data, "role": "task"}, {**safety, "role": "safety"}], s,
                          ["stage1", *data_inputs(stage2_data), *safety_inputs], config.corpus.n)
                add_model(f"mixed-s{s}", f"mixed-s{s}", ref(f"mixed-s{s}", "model"),
                          "remedy: safety data mixed into stage 2", s)
    if "dpo" in config.arms:
        for s in seeds:
            if config.data.pairs is None:
                dag.add(Stage(f"pairs-s{s}", "pairs", {"model": ref(f"stage2-s{s}", "model"), "images": corpus,
                                                       **config.pairs.model_dump(), "seed": s},
                              inputs=[f"stage2-s{s}", "corpus"],
                              cost_s=gen(config.pairs.n_harmful + config.pairs.n_benign, config.pairs.max_new_tokens),
                              command=f"vlsafe safety pairs --model stages/stage2-s{s}/run/final --out "
                                      f"stages/pairs-s{s}/data --images stages/corpus/corpus"))
                pairs = {"path": ref(f"pairs-s{s}", "data"), "format": "jsonl"}
            else:
                pairs = config.data.pairs.model_dump()
            add_train(f"dpo-s{s}", "dpo", ref(f"stage2-s{s}", "model"), [pairs], s,
                      [f"stage2-s{s}", *([f"pairs-s{s}"] if pairs["path"].startswith("@") else [])],
                      config.pairs.n_harmful + config.pairs.n_benign)
            add_model(f"dpo-s{s}", f"dpo-s{s}", ref(f"dpo-s{s}", "model"), "remedy: DPO on on-policy pairs", s)

    # --- merges: the adapted VLM with each partner (the aligned LLM enters as VLM@0's language model)
    if config.merges is not None:
        sweep = config.merges
        for s in seeds:
            for partner in sweep.partners:
                partner_stage = "vlm0" if partner == "aligned" else f"{partner}-s{s}"
                for method in sweep.methods:
                    if partner == "aligned" and method in TA_FAMILY:
                        continue  # over VLM@1 the aligned LLM's task vector is zero: only interpolation means anything
                    for weight in sweep.weights:
                        name = f"merge-{method}-{partner}-{weight:g}-s{s}"
                        merge = _merge_config(method, ref(f"stage2-s{s}", "model"), ref(partner_stage, "model"),
                                              ref("stage1", "model"), weight, sweep.density,
                                              ["language_model"] if partner == "aligned" else
                                              ["language_model", "projector"])
                        inputs = [f"stage2-s{s}", partner_stage] + (["stage1"] if method in TA_FAMILY else [])
                        dag.add(Stage(name, "merge", {"merge": merge}, inputs=inputs, cost_s=c.merge_s,
                                      command=f"vlsafe merge stages/{name}/merge.yaml --out stages/{name}/model"))
                        add_model(name, name, ref(name, "model"), f"merge: {method} with {partner}, weight {weight:g}",
                                  s, method=method, partner=partner, weight=weight)

    # --- measuring: the suite, legibility, every model's eval, the layer analysis
    dag.add(Stage("suite", "suite", {"suite": suite, "name": suite_name}, cost_s=0.0,
                  files=[config.eval.suite] if Path(config.eval.suite).is_file() else []))
    legibility_tokens = min(16, suite["max_new_tokens"])
    for s in seeds:
        name = f"legibility-adapted-s{s}"
        dag.add(Stage(name, "legibility", {"model": ref(f"stage2-s{s}", "model"), "n": config.eval.legibility_items,
                                           "seed": s, "max_new_tokens": legibility_tokens},
                      inputs=[f"stage2-s{s}"], cost_s=gen(config.eval.legibility_items, legibility_tokens)))
    for model_name, model in plan.models.items():
        producer = model["stage"]
        is_vlm = model_name not in ("llm", "aligned") and not model_name.startswith("control")
        dag.add(Stage(f"eval-{model_name}", "eval",
                      {"model": model["ref"], "suite": ref("suite", "suite"), "corpus": corpus,
                       "judges": config.eval.judges, "batch_size": config.eval.batch_size,
                       "dtype": config.eval.dtype},
                      inputs=[i for i in (producer, "suite", "corpus") if i],
                      models=[] if producer else model_specs(model["ref"]),
                      files=[] if producer else model_files(model["ref"]),
                      cost_s=gen(_eval_items(suite, is_vlm, heldout), suite["max_new_tokens"]),
                      command=f"vlsafe eval --model {model['ref']} --suite stages/suite/suite.yaml --out "
                              f"stages/eval-{model_name}/eval --corpus stages/corpus/corpus "
                              f"--batch-size {config.eval.batch_size} --dtype {config.eval.dtype}"))
    if config.analysis:
        _add_analysis(plan, config, corpus, aligned, first)
    return plan


def _add_analysis(plan: Plan, config: StudyConfig, corpus: str, aligned: str, seed: int) -> None:
    """The layer analysis of the first seed's models, the merges it proposes, and their evaluations."""
    dag, c = plan.dag, machine_costs(config)[0]
    chain = [("vlm1", "vlm1"), ("adapted", f"adapted-s{seed}"), ("sft", f"safety_sft-s{seed}"),
             ("dpo", f"dpo-s{seed}")]
    chain = [(short, name) for short, name in chain if name in plan.models]
    names = [short for short, _ in chain]
    pairs = [["adapted-vlm1", f"{short}-adapted"] for short in names[2:]]
    dag.add(Stage("analysis", "analysis",
                  {"models": [plan.models[name]["ref"] for _, name in chain], "names": names, "pairs": pairs,
                   "adapted": plan.models[f"adapted-s{seed}"]["ref"], "aligned": plan.models["aligned"]["ref"],
                   "corpus": corpus, "conditions": ["text", "typo"]},
                  inputs=[plan.models[name]["stage"] for _, name in chain] + ["corpus"] + (
                      ["align"] if config.aligns() else []),
                  cost_s=c.fixed_s * 20, command="vlsafe analyze weights --base stages/stage1/run/final --models ... "
                                                 "--out stages/analysis/weights; vlsafe analyze activations ..."))
    adapted = ref(f"stage2-s{seed}", "model")
    proposals = {"safety_layers": {"adapted": adapted, "aligned": ref("vlm0", "model")}}
    if len(pairs):
        proposals["gated"] = {"adapted": adapted, "safer": plan.models[chain[2][1]]["ref"]}
    if config.aligns():  # RESTA adds back (aligned - unaligned): the base LLM saved as weights first
        dag.add(Stage("llm", "save-llm", {"llm": config.llm}, models=[config.llm], cost_s=c.fixed_s,
                      command=f"(the base LLM {config.llm} saved as safetensors)"))
        proposals["resta"] = {"adapted": adapted, "aligned": aligned, "unaligned": ref("llm", "model")}
    if f"safety_sft-s{seed}" in plan.models:
        proposals["expo"] = {"sft": plan.models[f"safety_sft-s{seed}"]["ref"], "parent": adapted}
    for builder, args in proposals.items():
        name = f"merge-{builder}-s{seed}"
        inputs = sorted({"analysis", *(a[1:].split(":")[0] for a in args.values() if a.startswith("@"))})
        dag.add(Stage(name, "analysis-merge", {"builder": builder, "args": args}, inputs=inputs, cost_s=c.merge_s,
                      command=f"vlsafe merge stages/{name}/merge.yaml --out stages/{name}/model"))
        plan.models[name] = {"stage": name, "ref": ref(name, "model"), "role": f"merge: {builder} (from the layer "
                             "analysis)", "seed": seed, "method": builder}
        dag.add(Stage(f"eval-{name}", "eval", {"model": ref(name, "model"), "suite": ref("suite", "suite"),
                                               "corpus": corpus, "judges": config.eval.judges,
                                               "batch_size": config.eval.batch_size, "dtype": config.eval.dtype},
                      inputs=[name, "suite", "corpus"], cost_s=plan.dag.stages[f"eval-adapted-s{seed}"].cost_s,
                      command=f"vlsafe eval --model stages/{name}/model --suite stages/suite/suite.yaml --out "
                              f"stages/eval-{name}/eval --corpus stages/corpus/corpus "
                              f"--batch-size {config.eval.batch_size} --dtype {config.eval.dtype}"))


def _merge_config(method: str, adapted: str, partner: str, ancestor: str, weight: float, density: float,
                  scope: list[str]) -> dict:
    """linear: (1 - w) adapted + w partner. Task-arithmetic family: the ancestor VLM@1 plus the adapted VLM's task
    vector and w times the partner's (not normalised), with `density` for the sparsifying methods."""
    if method == "linear":
        return {"merge_method": "linear", "base_model": adapted, "scope": scope,
                "models": [{"model": adapted, "parameters": {"weight": round(1 - weight, 6)}},
                           {"model": partner, "parameters": {"weight": weight}}]}
    per_model = {"density": density} if method != "task_arithmetic" else {}
    return {"merge_method": method, "base_model": ancestor, "scope": scope, "parameters": {"normalize": False},
            "models": [{"model": adapted, "parameters": {"weight": 1.0, **per_model}},
                       {"model": partner, "parameters": {"weight": weight, **per_model}}]}
