"""The protocol's jobs: the base model's own answers, the layer probe, training, evaluation, eNTK.

Every job takes the run's :class:`Plan` (plain paths and settings, so it pickles into a worker
process), reads its inputs from disk, writes its outputs atomically, and returns at once when
they already exist. ``pipeline`` lists the jobs and their order.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import torch

from dcr_fast import atomic, fingerprint, models
from dcr_fast.config import config_from_dict, config_to_dict
from dcr_fast.data import SEEMINGLY_TOXIC, TOXIC, Prompt, load_benchmark
from dcr_fast.data.files import load_pairs, load_prompts, read_jsonl
from dcr_fast.reproduce.config import ReproduceConfig
from dcr_fast.reproduce.protocol_data import DATA_SEED, INSTRUCTIONS, SAFETY_HELDOUT, benchmark_source


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every job needs: the resolved base model, the settings, and where things live."""

    out: str
    base: str  # resolved base model directory (or hub id)
    config: dict[str, Any]  # ReproduceConfig as a dict
    stages: dict[str, dict[str, Any]]  # the preset's dcr and sft sections

    @property
    def settings(self) -> ReproduceConfig:
        return ReproduceConfig(**self.config)

    def path(self, *parts: str) -> Path:
        return Path(self.out).joinpath(*parts)

    def data(self, name: str) -> str:
        return str(self.path("data", f"{name}.jsonl"))

    def run_dir(self, run: str, seed: int | None) -> Path:
        return self.path("base") if run == "base" else self.path(f"seed{seed}", run)

    def model_dir(self, run: str, seed: int | None) -> str:
        return self.base if run == "base" else str(self.run_dir(run, seed) / "model")


# --- the base model's own answers ------------------------------------------------------------------


def answers_job(plan: Plan) -> None:
    """Greedy answers of the base model: STL's general data (when self-distilled), STL-aug's
    answered seemingly toxic prompts, and the references of the general-ability proxy."""
    from dcr_fast.evaluation import GenerationConfig, generate, is_refusal

    done = plan.path("answers", "summary.json")
    if done.exists():
        return
    settings = plan.settings
    general = [] if plan_uses_alpaca(plan) else read_prompts(plan.data("general-prompts"))
    seemingly = read_prompts(plan.data("dcr-seemingly-toxic"))
    heldout = read_prompts(plan.data("heldout-instructions"))
    model, tokenizer = models.load(plan.base, dtype=settings.dtype, device=settings.device)
    prompts = general + seemingly + heldout
    config = GenerationConfig(settings.answer_max_new_tokens, settings.eval_batch_size, progress=True)
    answers = [_whole_sentences(a, tokenizer, settings.answer_max_new_tokens) for a in generate(model, tokenizer, prompts, config)]
    by_prompt = dict(zip(prompts, answers))
    general_pairs = [(p, by_prompt[p]) for p in general if by_prompt[p] and not is_refusal(by_prompt[p])]
    aug_pairs = [(p, by_prompt[p]) for p in seemingly if by_prompt[p] and not is_refusal(by_prompt[p])]
    if general and not general_pairs or not aug_pairs:
        raise ValueError(f"answers: the base model answered none of {len(general)} general instructions / "
                         f"{len(seemingly)} XSTest prompts with a non-empty, non-refusing answer; is {plan.base!r} "
                         "an instruct model?")
    if general:
        write_pairs(plan.path("answers", "general.jsonl"), general_pairs)
    write_pairs(plan.path("answers", "aug.jsonl"), aug_pairs)
    write_pairs(plan.path("answers", "heldout.jsonl"), [(p, by_prompt[p]) for p in heldout])
    atomic.write_json(done, {"general": [len(general_pairs), len(general)], "aug": [len(aug_pairs), len(seemingly)],
                             "heldout": len(heldout), "max_new_tokens": settings.answer_max_new_tokens,
                             "note": "[kept, asked]: empty answers and refusals are dropped"})


def _whole_sentences(answer: str, tokenizer, max_new_tokens: int) -> str:
    """An answer cut by the token budget, trimmed back to its last full sentence (if it has one)."""
    answer = answer.strip()
    if len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < max_new_tokens - 1:
        return answer
    end = max(answer.rfind(mark) for mark in (". ", ".\n", "! ", "? ", "\n\n"))
    return answer[: end + 1].strip() if end > 0 else answer


def plan_uses_alpaca(plan: Plan) -> bool:
    return bool(plan.config["alpaca"])


# --- the layer probe -------------------------------------------------------------------------------


def layer_job(plan: Plan) -> None:
    """Per-layer separability of DCR's two training subsets in the base model (paper A.9).

    The refined layer is the middle-third layer where the base model separates them best:
    the paper refines an intermediate layer (shallow ones barely change the tail's eNTK, deep
    ones move many parameters), and among those the one whose features already tell the
    subsets apart most needs the least change to separate them. Only DCR's own training
    prompts are used: never an evaluated prompt.
    """
    from dcr_fast.evaluation.separability import kmeans_hungarian_accuracy, last_token_hidden_states

    out = plan.path("layer.json")
    if out.exists():
        return
    settings = plan.settings
    rng = random.Random(DATA_SEED)
    subsets = [read_prompts(plan.data("dcr-seemingly-toxic")), read_prompts(plan.data("dcr-toxic"))]
    subsets = [rng.sample(s, min(settings.layer_probe_prompts, len(s))) for s in subsets]
    model, tokenizer = models.load(plan.base, dtype=settings.dtype, device=settings.device)
    hidden = last_token_hidden_states(model, tokenizer, subsets[0] + subsets[1], batch_size=settings.eval_batch_size)
    labels = ["seemingly_toxic"] * len(subsets[0]) + ["toxic"] * len(subsets[1])
    accuracy = [kmeans_hungarian_accuracy(h, labels) for h in hidden]
    layers = len(hidden) - 1
    window = range(max(1, round(layers / 3)), min(layers - 1, round(2 * layers / 3)) + 1)
    chosen = max(window, key=lambda layer: (accuracy[layer], -layer))
    atomic.write_json(out, {"accuracy_per_layer": accuracy, "window": [window.start, window.stop - 1],
                            "chosen": chosen, "prompts": [len(s) for s in subsets],
                            "rule": "highest k-means separability of DCR's training subsets within the middle third"})


def dcr_layer(plan: Plan) -> int:
    return plan.config["dcr_layer"] or json.loads(plan.path("layer.json").read_text())["chosen"]


# --- training --------------------------------------------------------------------------------------


def train_job(plan: Plan, run: str, seed: int) -> None:
    """One trained model: ``stl``, ``stl-aug``, ``dcr`` or ``dcr+stl`` for ``seed`` (resumes)."""
    config, train = training_config(plan, run, seed)
    if not _finished(plan.run_dir(run, seed), config):
        train(config)


def training_config(plan: Plan, run: str, seed: int):
    """The stage config of ``run`` for ``seed``, and the function that trains it."""
    from dcr_fast.train.dcr import DCRConfig, run_dcr
    from dcr_fast.train.sft import SFTConfig, run_sft

    settings = plan.settings
    common = {"seed": seed, "device": settings.device, "resume": True, "out": str(plan.run_dir(run, seed)),
              "progress": False}
    if run == "dcr":
        fields = {**plan.stages["dcr"], **common, "model": plan.base, "layer": dcr_layer(plan),
                  "seemingly_toxic": [plan.data("dcr-seemingly-toxic")], "toxic": [plan.data("dcr-toxic")]}
        return config_from_dict(DCRConfig, fields), run_dcr
    general = plan.data("general") if plan_uses_alpaca(plan) else str(plan.path("answers", "general.jsonl"))
    data = {"data": [general], "safety_data": [plan.data("safety")]}
    if run == "stl-aug":
        data["aug_data"] = [str(plan.path("answers", "aug.jsonl"))]
    start = plan.model_dir("dcr", seed) if run == "dcr+stl" else plan.base
    return config_from_dict(SFTConfig, {**plan.stages["sft"], **common, **data, "model": start}), run_sft


def _finished(out: Path, config) -> bool:
    """Whether ``out`` holds this exact run, finished; a finished run with other settings is refused."""
    summary = out / "summary.json"
    if not summary.exists():
        return False
    saved = json.loads(summary.read_text())
    changed = fingerprint.differences(comparable_config(saved.get("config", {})), comparable_config(config_to_dict(config)))
    if changed:
        raise ValueError(f"out: {str(out)!r} holds a run trained with other settings ({'; '.join(changed)}); "
                         "use another --out")
    return bool(saved.get("finished"))


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """A stage config's settings: without the fields that may differ between a run and its continuation,
    nor the paths this protocol derives from the output folder (their contents are keyed separately:
    ``data/protocol.json`` holds the selection, and the base model's answers are one job's output)."""
    return {k: v for k, v in config.items() if k not in _NOT_SETTINGS}


_NOT_SETTINGS = {"resume", "overwrite", "max_steps", "save_every", "progress", "out", "data", "safety_data", "aug_data",
                 "seemingly_toxic", "toxic"}


# --- evaluation ------------------------------------------------------------------------------------


def eval_job(plan: Plan, run: str, seed: int | None) -> None:
    """Compliance and defense success per benchmark, refusal probability, the general-ability
    proxy, and the separation of XSTest's two halves at the refined layer."""
    from dcr_fast.evaluation import EvalConfig, evaluate, refusal_probability
    from dcr_fast.evaluation.refusal import RefusalFilter

    out = plan.run_dir(run, seed) / "eval"
    result_path = out / "eval.json"
    settings = plan.settings
    benchmarks = evaluation_sets(plan)
    config = EvalConfig(max_new_tokens=settings.eval_max_new_tokens, batch_size=settings.eval_batch_size,
                        refusal_probability=False, stop_when_judged=settings.stop_when_judged, progress=False)
    model_key = fingerprint.model_fingerprint(plan.model_dir(run, seed))
    key = {"model": model_key["sha256"], "dtype": settings.dtype, "eval": dataclasses.asdict(config),
           "refusal_probability": settings.refusal_probability, "layer": dcr_layer(plan),
           "prompts": fingerprint.text_sha256(json.dumps({n: [p.text for p in ps] for n, ps in benchmarks.items()}))}
    if result_path.exists() and json.loads(result_path.read_text()).get("key") == key:
        return
    model, tokenizer = models.load(plan.model_dir(run, seed), dtype=settings.dtype, device=settings.device)
    # an evaluation whose key differs (the model was retrained, a setting changed) is redone from scratch
    result = evaluate(model, tokenizer, benchmarks, config, judge=RefusalFilter(), out_dir=out, model_key=model_key,
                      overwrite=result_path.exists())
    result["refusal_probability"] = {}
    for name in settings.refusal_probability:
        prompts = benchmarks[name]
        probs = refusal_probability(model, tokenizer, [p.text for p in prompts], batch_size=settings.eval_batch_size,
                                    progress=False)
        result["refusal_probability"][name] = {c: float(probs[[i for i, p in enumerate(prompts) if p.category == c]].mean())
                                               for c in sorted({p.category for p in prompts})}
    result["general"] = general_proxy(plan, model, tokenizer)
    result["xstest_split"] = _xstest_split(plan, out)
    result["separation"] = _xstest_separation(plan, model, tokenizer)
    result["key"] = key
    atomic.write_json(result_path, result)


def evaluation_sets(plan: Plan) -> dict[str, list[Prompt]]:
    """The evaluated prompts, as ``prepare`` selected them (``OUT/data/eval-<name>.jsonl``)."""
    sets = {}
    for name in [*plan.config["benchmarks"], INSTRUCTIONS, SAFETY_HELDOUT]:
        path = Path(plan.data(f"eval-{name}"))
        if path.exists():
            rows = read_jsonl(path, f"reproduce: the evaluated prompts of {name!r}")
            sets[name] = [Prompt(r["text"], r["category"], r["source"], r.get("subset")) for r in rows]
    return sets


@torch.no_grad()
def general_proxy(plan: Plan, model, tokenizer) -> dict[str, float]:
    """How far the model's answers to held-out benign instructions moved from the base model's.

    Teacher-forced on the base model's own greedy answers (``answers/heldout.jsonl``):
    ``nll`` is the mean negative log-likelihood per answer token, and ``agreement`` the
    fraction of answer tokens where the model's argmax is the base model's token; for the
    base model itself that is its own greedy path (agreement ~1, short of it only where an
    answer was trimmed or re-tokenizes differently).
    """
    return answer_fidelity(model, tokenizer, read_pairs(plan.path("answers", "heldout.jsonl")))


@torch.no_grad()
def answer_fidelity(model, tokenizer, pairs: list[tuple[str, str]], *, row_tokens: int = 2048) -> dict[str, float]:
    """Per-token NLL and argmax agreement of ``model`` on (prompt, answer) pairs, teacher-forced,
    over each answer's own tokens (not the chat template's end-of-turn tokens after it).

    The pairs run packed, about ``row_tokens`` tokens to a row, each attending to itself only,
    and only the positions that predict an answer token reach the output layer.
    """
    from dcr_fast.attention import packed_attention, packed_row
    from dcr_fast.chat import encode_prompt

    device = next(model.parameters()).device
    encoded = []
    for prompt, answer in pairs:
        prompt_ids = encode_prompt(tokenizer, prompt)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if answer_ids:
            encoded.append((prompt_ids, answer_ids))
    nll, agree, count = 0.0, 0, 0
    for row in _rows(encoded, row_tokens):
        input_ids, positions, bounds = packed_row([prompt_ids + answer_ids for prompt_ids, answer_ids in row], device)
        scored, start = [], 0  # the positions that predict an answer token
        for prompt_ids, answer_ids in row:
            scored += range(start + len(prompt_ids) - 1, start + len(prompt_ids) + len(answer_ids) - 1)
            start += len(prompt_ids) + len(answer_ids)
        with packed_attention(model):
            hidden = model.get_decoder()(input_ids=input_ids, position_ids=positions, use_cache=False,
                                         **bounds).last_hidden_state[0]
        logits = model.get_output_embeddings()(hidden[torch.tensor(scored, device=device)])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
        targets = torch.tensor([t for _, answer_ids in row for t in answer_ids], device=device)
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        agree += int((logits.argmax(-1) == targets).sum())
        count += len(targets)
    if not count:
        return {}
    return {"nll": nll / count, "agreement": agree / count, "answers": len(pairs), "tokens": count}


def _rows(encoded: list[tuple[list[int], list[int]]], row_tokens: int) -> list[list[tuple[list[int], list[int]]]]:
    """``encoded`` in order, cut into rows of about ``row_tokens`` tokens (at least one pair each)."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    size = row_tokens
    for pair in encoded:
        if size + len(pair[0]) + len(pair[1]) > row_tokens:
            rows.append([])
            size = 0
        rows[-1].append(pair)
        size += len(pair[0]) + len(pair[1])
    return rows


def _xstest_split(plan: Plan, eval_dir: Path) -> dict[str, Any] | None:
    """XSTest compliance on the safe prompts DCR trained on and on those it did not (if any)."""
    generations = eval_dir / "generations" / "xstest.jsonl"
    if not generations.exists():
        return None
    seen = set(read_prompts(plan.data("dcr-seemingly-toxic")))
    rows = read_jsonl(generations, "reproduce: the XSTest generations")
    split = {"in_dcr": [r for r in rows if r["category"] == SEEMINGLY_TOXIC and r["prompt"] in seen],
             "held_out": [r for r in rows if r["category"] == SEEMINGLY_TOXIC and r["prompt"] not in seen]}
    return {name: {"compliance": 1 - sum(r["refusal"] for r in part) / len(part), "n": len(part)}
            for name, part in split.items() if part}


def _xstest_separation(plan: Plan, model, tokenizer) -> dict[str, Any] | None:
    """k-means separability (A.9) of XSTest safe vs unsafe prompts at the refined layer: whether the
    Circle stage's separation reaches prompts it never saw (a measurement, never used to tune).
    The states are the Circle stage's own: packed, and only the layers up to the refined one run."""
    from dcr_fast.chat import encode_prompt
    from dcr_fast.evaluation.separability import kmeans_hungarian_accuracy
    from dcr_fast.train.dcr import prompt_embeddings

    prompts = evaluation_sets(plan).get("xstest")
    if not prompts:
        return None
    layer = dcr_layer(plan)
    encoded = [encode_prompt(tokenizer, p.text) for p in prompts]
    device = next(model.parameters()).device
    batch = plan.config["eval_batch_size"]
    hidden = torch.cat([prompt_embeddings(model, encoded[i : i + batch], layer, device=device, nll=False)[0].float()
                        for i in range(0, len(encoded), batch)])
    return {"layer": layer, "kmeans_accuracy": kmeans_hungarian_accuracy(hidden.cpu(), [p.category for p in prompts]),
            "prompts": len(prompts)}


# --- eNTK before and after DCR ----------------------------------------------------------------------


def entk_job(plan: Plan, seed: int) -> None:
    """Mean normalized eNTK similarity per group pair (toxic / seemingly toxic / normal), for the
    base model and after DCR (the paper's Fig. 6), over θ_S = the top decoder layers + lm_head."""
    from dcr_fast.ntk import entk_matrix

    out = plan.path("entk", "entk.json")
    settings = plan.settings
    key = {"before": fingerprint.model_fingerprint(plan.model_dir("base", None))["sha256"],
           "after": fingerprint.model_fingerprint(plan.model_dir("dcr", seed))["sha256"],
           "settings": [settings.entk_prompts, settings.entk_tail_layers, settings.entk_k]}
    if out.exists() and json.loads(out.read_text()).get("key") == key:
        return
    rng = random.Random(DATA_SEED)
    xstest = load_benchmark("xstest", benchmark_source("xstest", settings.data))
    groups = {
        "toxic": rng.sample([p.text for p in xstest if p.category == TOXIC], settings.entk_prompts),
        "seemingly_toxic": rng.sample(read_prompts(plan.data("dcr-seemingly-toxic")), settings.entk_prompts),
        "normal": rng.sample(read_prompts(plan.data("heldout-instructions")), settings.entk_prompts),
    }
    result = {"groups": list(groups), "prompts_per_group": settings.entk_prompts, "k": settings.entk_k,
              "tail_layers": settings.entk_tail_layers, "include_lm_head": True, "method": "exact", "seed": seed,
              "sources": {"toxic": "XSTest unsafe", "seemingly_toxic": "XSTest safe (DCR's)",
                          "normal": "held-out built-in instructions"}}
    for label, run in (("before", "base"), ("after", "dcr")):
        model, tokenizer = models.load(plan.model_dir(run, seed), dtype="float32", attn_implementation="eager",
                                       device=settings.device)
        matrix = entk_matrix(model, tokenizer, groups, k=settings.entk_k, tail_layers=settings.entk_tail_layers,
                             out_dir=plan.path("entk", label), progress=False, identity={"sha256": key[label]},
                             overwrite=out.exists())
        result[label] = matrix.means_dict()
    atomic.write_json(out, {**result, "key": key})


# --- files -----------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file this run wrote (none when it holds none)."""
    return load_prompts(str(path), Path(path).name) if Path(path).stat().st_size else []


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    return load_pairs(str(path), Path(path).name) if Path(path).stat().st_size else []


def write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    atomic.write_text(path, "".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
