"""Stage runners end to end on tiny models and real HH data: pipeline, metrics, artifacts, exact resume."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import stages as stage_registry
from rlhf_jax.models import load
from rlhf_jax.registry import get_experiment
from rlhf_jax.stages import common
from rlhf_jax.training.artifacts import load_artifact
from rlhf_jax.training.logs import MetricsLogger, read_metrics

REPO = Path(__file__).resolve().parents[1]
PPO_METRICS = ("reward/mean", "reward/std", "kl/mean", "kl/coef", "policy/entropy", "policy/ratio_mean",
               "policy/clipfrac", "policy/approx_kl", "value/loss", "value/explained_var", "value/clipfrac",
               "response/length_mean", "response/eos_fraction", "time/generate", "time/score", "time/train",
               "throughput/tokens_per_s")


class Killed(Exception):
    pass


def _killing_logger(at_step):
    class KillingLogger(MetricsLogger):
        def log(self, step, metrics):
            values = super().log(step, metrics)
            if step == at_step:
                raise Killed(f"killed after step {step}")
            return values

    return KillingLogger


def _full_then_killed_and_resumed(experiment, name, tmp_path, monkeypatch, kill_after: int):
    """Run stage `name` uninterrupted in `tmp_path/full`, then in `tmp_path/resumed` killed after logging step
    `kill_after` (before its checkpoint) and relaunched; both end with the same params. Returns the stage dirs."""
    full = _run_stage(experiment, name, tmp_path / "full")
    monkeypatch.setattr(common, "MetricsLogger", _killing_logger(kill_after))
    with pytest.raises(Killed):
        _run_stage(experiment, name, tmp_path / "resumed")
    monkeypatch.setattr(common, "MetricsLogger", MetricsLogger)
    resumed = _run_stage(experiment, name, tmp_path / "resumed")
    _assert_same_params(load_artifact(full / "model").params, load_artifact(resumed / "model").params)
    return full, resumed


def _run_stage(experiment, name, run_dir):
    stage = experiment.stage(name)
    stage_dir = Path(run_dir) / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    runner = stage_registry.load_runner(stage.kind)
    runner(experiment, stage, stage_dir, stage_registry.make_resolver(experiment, Path(run_dir)))
    return stage_dir


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_sft_killed_mid_run_resumes_exactly(tmp_path, monkeypatch):
    experiment = get_experiment("tiny_sft")
    experiment = dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=4))
    full = _run_stage(experiment, "sft", tmp_path / "full")
    monkeypatch.setattr(common, "MetricsLogger", _killing_logger(6))
    with pytest.raises(Killed):
        _run_stage(experiment, "sft", tmp_path / "resumed")
    monkeypatch.setattr(common, "MetricsLogger", MetricsLogger)
    resumed = _run_stage(experiment, "sft", tmp_path / "resumed")  # restarts from the step-4 checkpoint
    _assert_same_params(load_artifact(full / "model").params, load_artifact(resumed / "model").params)
    steps = [r["step"] for r in read_metrics(resumed)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # steps 5-6 ran again after the kill, each logged once
    losses_full = [r["sft/loss"] for r in read_metrics(full)]
    losses_resumed = [r["sft/loss"] for r in read_metrics(resumed)]
    assert losses_resumed[-4:] == losses_full[-4:]


def test_the_sft_stage_packs_with_its_pack_lookahead():
    from rlhf_jax.config import SFTStage
    from rlhf_jax.stages import sft

    base = get_experiment("tiny_sft")

    def iterator(**stage):
        experiment = dataclasses.replace(base, data=dataclasses.replace(base.data, max_examples=32, max_length=256),
                                         stages=(SFTStage(name="sft", packing=True, **stage),))
        return sft._setup(experiment, experiment.stage("sft"), lambda source: source, None).iterator

    rows = base.data.batch_size
    default, short = iterator(), iterator(pack_lookahead=rows)
    assert (default.pack_lookahead, short.pack_lookahead) == (256, rows)
    assert short.get_state()["pack_lookahead"] == rows  # resuming with another lookahead is refused (test_data_loader)
    # a batch chooses from the next `rows` sequences only: at most one a row, so more batches for the same data
    batches = list(short)
    assert max(int(b["segment_ids"].max(axis=1).sum()) for b in batches) <= rows
    assert short.num_batches() == len(batches) > default.num_batches()
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == len(short.dataset) * short.num_epochs


@pytest.mark.slow
def test_packed_sft_trains_every_batch_of_its_epoch_and_resumes_exactly(tmp_path, monkeypatch):
    from rlhf_jax.config import SFTStage
    from rlhf_jax.stages import sft

    base = get_experiment("tiny_sft")
    experiment = dataclasses.replace(base, data=dataclasses.replace(base.data, max_examples=32),
                                     checkpoint=dataclasses.replace(base.checkpoint, every_steps=2),
                                     stages=(SFTStage(name="sft", packing=True),))
    iterator = sft._setup(experiment, experiment.stage("sft"), lambda source: source, None).iterator
    batches = list(iterator)
    assert sum(int(b["segment_ids"].max(axis=1).sum()) for b in batches) == len(iterator.dataset)
    assert iterator.pack_lookahead == 256  # the data iterator's default
    full, resumed = _full_then_killed_and_resumed(experiment, "sft", tmp_path, monkeypatch, kill_after=3)
    # one epoch is every packed batch of its plan, not the token count's lower bound
    assert [r["step"] for r in read_metrics(full)] == list(range(1, len(batches) + 1))
    assert [r["sft/loss"] for r in read_metrics(resumed)][-2:] == [r["sft/loss"] for r in read_metrics(full)][-2:]


# `tiny_pipeline`'s PPO metrics per iteration (fp32 CPU), recorded from the PPO stage as it stood before
# PPO, GRPO, RLOO and REINFORCE share one engine: reshaping the code must not change the numbers.
# Re-recorded when the SFT and RM steps were made faster (the LM head at loss positions only, unrolled
# layers and 2-D projections on CPU): their losses moved by float rounding (1e-7 relative); the reward
# model's offset, which its pairwise loss leaves free, then drifted by 0.5%, and PPO's value loss (0.2%) and
# one clipped value (of 256) followed. The PPO stage's code was not changed by it.
# Re-recorded again when the reward step moved to the per-pair loss and aggregate (`losses.aggregate`,
# metrics as `Weighted`): the same sum, rounded differently; the reward scores PPO reads moved by 3e-6
# relative, the critic (initialised from the reward model, whose offset is free) by enough to move the value
# loss 0.3% and clip one more value of 256. The PPO stage's code was not changed by it.
# Re-recorded when attention's backward began recomputing its probabilities (a custom VJP whose gradients equal
# autodiff's to float64 rounding, tests/test_models_decoder.py): the SFT and reward steps' gradients round
# differently, the policy's numbers moved by at most 3e-5 relative and, through the critic initialised from the
# reward model, the value loss by 5e-4. The PPO stage's code was not changed by it.
TINY_PIPELINE_PPO = (
    {"reward/mean": 0.42920854687690735, "reward/std": 0.5197599530220032, "kl/mean": 0.0,
     "value/explained_var": -1.106635332107544, "policy/approx_kl": 7.941669900901616e-05,
     "policy/entropy": 10.78860855102539, "policy/loss": -0.006979001685976982,
     "policy/ratio_mean": 0.9986828565597534, "ppo/loss": 0.1345798373222351, "value/clipfrac": 0.61328125,
     "value/loss": 1.41558837890625, "ppo/epochs": 2.0},
    {"reward/mean": -0.4258427023887634, "reward/std": 0.4525448679924011, "kl/mean": -0.018392562866210938,
     "kl/token_kl": -0.0011495351791381836, "reward/total": -0.4249231517314911,
     "value/explained_var": -0.9365679025650024, "policy/approx_kl": 2.794696411001496e-05,
     "policy/entropy": 10.788616180419922, "policy/loss": -0.0036944113671779633,
     "policy/ratio_mean": 1.000138282775879, "ppo/loss": 0.12088142335414886, "value/clipfrac": 0.42578125,
     "value/loss": 1.2457584142684937, "ppo/epochs": 2.0},
)

# The critic starts from the reward model, whose offset the pairwise loss leaves free, so its numbers carry the
# float32 rounding of the SFT and RM steps amplified: the values above were recorded on Intel CPUs; on an AMD EPYC
# (AVX-512, other XLA kernels) the same code gave value/loss 1.7e-3, ppo/loss (which adds vf_coef × value/loss)
# 1.8e-3 and value/explained_var 2.9e-4 away from them, while every policy and reward number stayed within
# 1.1e-4. Those three are held to 4e-3, about twice the spread measured between the two CPUs; the rest keep 2e-4.
CRITIC_METRICS = ("value/loss", "ppo/loss", "value/explained_var")
CRITIC_RTOL = 4e-3


@pytest.mark.slow
def test_tiny_pipeline_through_the_cli_then_relaunch_skips_done_stages(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_pipeline", f"run_dir={run_dir}"]
    first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("sft", "rm", "ppo", "samples"):
        assert (run_dir / stage / "DONE").is_file()
    # the PPO metrics carry the promised names, finite
    records = read_metrics(run_dir / "ppo")
    assert len(records) == 2
    for name in PPO_METRICS:
        assert name in records[-1], name
        assert np.isfinite(records[-1][name]), name
    # pinned: the PPO iteration's numbers as computed before the RL engine is reshaped (float tolerance)
    for record, pinned in zip(records, TINY_PIPELINE_PPO):
        for name, value in pinned.items():
            rtol = CRITIC_RTOL if name in CRITIC_METRICS else 2e-4
            np.testing.assert_allclose(record[name], value, rtol=rtol, atol=2e-6, err_msg=name)
    # reward model metrics and normalisation statistics reach the artifact PPO reads
    rm = load_artifact(run_dir / "rm" / "model", with_tokenizer=False)
    assert rm.kind == "scalar" and {"reward_mean", "reward_std", "train_set/accuracy"} <= set(rm.metadata)
    # stage outputs load by path, the PPO policy also as a Hugging Face directory
    config, params, tokenizer = load(run_dir / "ppo")
    hf_config, hf_params, _ = load(run_dir / "ppo" / "hf")
    assert tokenizer is not None and config.vocab_size == hf_config.vocab_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(hf_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a stage output converts to a Hugging Face directory like any other model
    from rlhf_jax.convert import main as convert_main

    assert convert_main([str(run_dir / "sft"), str(tmp_path / "sft_hf")]) == 0
    sft_config, sft_params, _ = load(tmp_path / "sft_hf")
    for a, b in zip(jax.tree.leaves(load_artifact(run_dir / "sft" / "model").params), jax.tree.leaves(sft_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    generations = [json.loads(line) for line in (run_dir / "samples" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4
    # the samples stage prints each response under the end of its prompt (rich drops BEL/BS, expands tabs)
    def words(text):
        return " ".join(text.translate({0x07: None, 0x08: None}).split())

    for generation in generations:
        expected = f"{words(generation['prompt_text'])[-50:]} response: {words(generation['completion']) or '(empty)'}"
        assert expected in words(first.stdout), expected
    second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("already done") == 4


@pytest.mark.slow
def test_ppo_killed_mid_run_resumes_exactly(tmp_path, monkeypatch):
    experiment = get_experiment("tiny_pipeline")
    ppo_stage = dataclasses.replace(experiment.stage("ppo"), max_steps=3)
    experiment = dataclasses.replace(
        experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1),
        stages=tuple(ppo_stage if s.name == "ppo" else s for s in experiment.stages))
    base = tmp_path / "base"
    _run_stage(experiment, "sft", base)
    _run_stage(experiment, "rm", base)
    for name in ("full", "resumed"):
        (tmp_path / name).mkdir()
        for stage in ("sft", "rm"):
            (tmp_path / name / stage).symlink_to(base / stage)
    full, resumed = _full_then_killed_and_resumed(experiment, "ppo", tmp_path, monkeypatch, kill_after=2)
    full_records, resumed_records = read_metrics(full), read_metrics(resumed)
    for key in ("reward/mean", "kl/coef", "kl/mean", "policy/clipfrac"):
        assert resumed_records[-1][key] == full_records[-1][key], key


def test_a_non_finite_loss_stops_the_stage_before_checkpointing_it(tmp_path):
    import jax.numpy as jnp

    from rlhf_jax.errors import UserError
    from rlhf_jax.training.checkpoint import Checkpointer
    from rlhf_jax.training.state import TrainState, make_optimizer

    experiment = get_experiment("tiny_sft")
    experiment = dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1))
    state = TrainState.create({"w": jnp.zeros(2)}, make_optimizer("sgd", 0.1), jax.random.key(0))

    def step_fn(state, batch):
        loss = jnp.where(state.step == 2, jnp.nan, 1.0)  # the third step diverges
        return state.replace(step=state.step + 1), {"sft/loss": loss}

    batches = iter([{"x": np.zeros(1)}] * 10)
    with pytest.raises(UserError, match=r"stage sft: sft/loss is nan at step 3; stopping"):
        common.fit(experiment=experiment, stage=experiment.stage("sft"), stage_dir=tmp_path, state=state,
                   step_fn=step_fn, batches=batches, total_steps=10, host_state=dict,
                   restore_host_state=lambda saved: None)
    assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2
    assert not (tmp_path / "model").exists()


def test_ppo_refuses_a_reward_model_as_policy_and_a_language_model_as_reward_model(tmp_path):
    from rlhf_jax.errors import UserError
    from rlhf_jax.models import llama
    from rlhf_jax.training.artifacts import save_artifact

    config, params, tokenizer = load("tiny:smollm2")
    lm_dir = save_artifact(tmp_path / "lm", config, params, tokenizer, "lm")
    rm_dir = save_artifact(tmp_path / "rm", config, llama.init_scalar_model(config, params, jax.random.key(1)),
                           tokenizer, "scalar")
    experiment = get_experiment("tiny_pipeline")
    for policy, reward_model, message in ((str(rm_dir), str(rm_dir), "policy: expected a language model"),
                                          (str(lm_dir), str(lm_dir),
                                           "reward_model: reward .*: a language model, expected a reward model")):
        stage = dataclasses.replace(experiment.stage("ppo"), policy=policy, reward_model=reward_model)
        runner = stage_registry.load_runner("ppo")
        with pytest.raises(UserError, match=message):
            runner(experiment, stage, tmp_path / "ppo", stage_registry.make_resolver(experiment, tmp_path))
        assert not (tmp_path / "ppo" / "model").exists()


@pytest.mark.slow
def test_reward_stage_with_a_frozen_backbone_trains_only_a_zero_initialised_head(tmp_path):
    experiment = get_experiment("tiny_pipeline")
    stage = dataclasses.replace(experiment.stage("rm"), model="tiny:smollm2", freeze_backbone=True,
                                learning_rate=1e-2, max_steps=4)
    experiment = dataclasses.replace(experiment, stages=(stage,))
    stage_dir = _run_stage(experiment, "rm", tmp_path)
    _, lm_params, _ = load("tiny:smollm2")
    model = load_artifact(stage_dir / "model", with_tokenizer=False).params
    backbone = {k: v for k, v in lm_params.items() if k != "lm_head"}
    _assert_same_params(backbone, model["backbone"])  # bit-identical: no gradient reached it
    assert np.any(np.asarray(model["head"]["kernel"]) != 0)  # the head started at zero and learned
    from rlhf_jax.training.checkpoint import Checkpointer

    assert Checkpointer(stage_dir / "checkpoints").latest_step() == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_grpo", "tiny_rloo", "tiny_reinforce"])
def test_critic_free_rl_killed_mid_run_resumes_exactly(tmp_path, monkeypatch, name):
    """GRPO, RLOO and REINFORCE (the same runner and `fit` loop as PPO, no critic) stopped after iteration 3
    and relaunched end with the uninterrupted run's params and metrics, each iteration logged once."""
    experiment = get_experiment(name)
    stage = dataclasses.replace(experiment.stages[0], max_steps=5)
    experiment = dataclasses.replace(experiment, stages=(stage,),
                                     checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1))
    full, resumed = _full_then_killed_and_resumed(experiment, stage.name, tmp_path, monkeypatch, kill_after=3)
    timing = ("time/", "throughput/")
    strip = lambda records: [{k: v for k, v in r.items() if k != "time" and not k.startswith(timing)}  # noqa: E731
                             for r in records]
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4, 5]
    assert strip(read_metrics(resumed)) == strip(read_metrics(full))
    in_loss = stage.algorithm.kl_placement == "loss"  # GRPO; RLOO and REINFORCE put the KL in the reward
    assert "value/loss" not in read_metrics(full)[-1] and ("policy/kl_loss" in read_metrics(full)[-1]) == in_loss
    assert (full / "hf" / "config.json").is_file()  # exported like PPO's policy


@pytest.mark.parametrize("name", ["tiny_rloo", "tiny_reinforce"])
def test_rloo_and_reinforce_run_through_the_same_runner_without_a_critic(tmp_path, name):
    experiment = get_experiment(name)
    stage = experiment.stages[0]
    stage_dir = _run_stage(experiment, stage.name, tmp_path)
    records = read_metrics(stage_dir)
    assert [r["step"] for r in records] == list(range(1, stage.max_steps + 1))
    last = records[-1]
    assert "value/loss" not in last and "policy/kl_loss" not in last  # no critic; the KL is in the reward
    assert last["kl/coef"] == pytest.approx(stage.algorithm.kl_coef) and np.isfinite(last["reward/token_id_below"])
    assert (stage_dir / "hf" / "config.json").is_file() and (stage_dir / "model").is_dir()


def test_grpo_with_weighted_reward_sources_held_out_evaluation_and_no_reference(tmp_path, monkeypatch):
    """One GRPO stage with two reward sources summed with weights (each logged on its own), β = 0 (no
    reference is loaded or run: no kl/* metrics), held-out greedy evaluation before training, every 2
    iterations and at the end (not the sampling temperature: greedy), and the stage's `algorithm` object
    reaching the trainer as it is."""
    from rlhf_jax.trainers import rl

    experiment = get_experiment("tiny_grpo")
    stage = experiment.stage("grpo")
    stage = dataclasses.replace(
        stage, max_steps=3, eval_every=2, extra_rewards=("fn:length:0.01",), reward_weights=(1.0, 0.5),
        algorithm=dataclasses.replace(stage.algorithm, kl_coef=0.0, update_epochs=1, mini_batch_size=16))
    experiment = dataclasses.replace(experiment, stages=(stage,),
                                     data=dataclasses.replace(experiment.data, eval_fraction=0.1))
    seen = []
    real = rl.make_experience
    monkeypatch.setattr(rl, "make_experience", lambda *args, **kwargs: (seen.append(args[2]), real(*args, **kwargs))[1])
    records = read_metrics(_run_stage(experiment, "grpo", tmp_path))
    assert seen and all(algorithm is stage.algorithm for algorithm in seen)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["step"] for r in records if "eval/reward_mean" in r] == [0, 2, 3]
    for record in records:
        if "eval/reward_mean" in record:
            assert 0 <= record["eval/reward_mean"] <= 1 + 0.5 * 0.01 * 16 + 1e-6 and record["time/eval"] > 0, record
            # each source's held-out mean on its own, and the weighted sum of them
            np.testing.assert_allclose(record["eval/reward_mean"], record["eval/reward/token_id_below"]
                                       + 0.5 * record["eval/reward/length"], rtol=1e-5)
    # the run's report draws the held-out curve
    from rlhf_jax.config import save_config
    from rlhf_jax.report import build_report

    save_config(experiment, tmp_path / "config.json")
    build_report(tmp_path)
    assert (tmp_path / "report" / "grpo_held_out_reward.png").stat().st_size > 0
    for record in records[1:]:
        assert not any(name.startswith("kl/") for name in record)
        np.testing.assert_allclose(record["reward/mean"],
                                   record["reward/token_id_below"] + 0.5 * record["reward/length"], rtol=1e-5)



def test_grpo_with_shared_prefix_logs_the_metrics_of_separate_rows(tmp_path, monkeypatch):
    """Each prompt once per group in the reward model's scoring, the experience pass and the update (the
    default, `shared_prefix` None, where the groups fit, as here) on the same rollouts as
    `stages.grpo.shared_prefix=false`: an iteration's rewards (a reward model's and a function's), KL, losses and
    entropy are those of the separate rows."""
    from rlhf_jax.models import llama
    from rlhf_jax.training.artifacts import save_artifact

    config, params, tokenizer = load("tiny:smollm2")
    rm_dir = save_artifact(tmp_path / "rm", config, llama.init_scalar_model(config, params, jax.random.key(1)),
                           tokenizer, "scalar")
    experiment = get_experiment("tiny_grpo")
    base = dataclasses.replace(experiment.stage("grpo"), max_steps=1, reward_model=str(rm_dir),
                               extra_rewards=("fn:token_id_below:24576",), reward_weights=(1.0, 1.0),
                               algorithm=dataclasses.replace(experiment.stage("grpo").algorithm, update_epochs=1,
                                                             mini_batch_size=16))
    from rlhf_jax import rewards

    groups_scored = []
    real = rewards.model_scores
    monkeypatch.setattr(rewards, "model_scores", lambda *args: (groups_scored.append(args[-1]), real(*args))[1])
    logged = {}
    assert base.shared_prefix is None
    for shared in (False, None):
        stage = dataclasses.replace(base, shared_prefix=shared)
        run = dataclasses.replace(experiment, stages=(stage,))
        logged[shared] = read_metrics(_run_stage(run, "grpo", tmp_path / str(shared)))[-1]
    assert groups_scored == [1, 4]  # traced once per run: by default the reward model saw the groups
    names = [n for n in logged[False] if n.startswith(("reward/", "kl/", "policy/", "response/", "ppo/loss"))]
    assert {"kl/mean", "policy/kl_loss", "policy/loss", "policy/entropy", "reward/mean", "reward/rm",
            "reward/token_id_below"} <= set(names)
    for name in names:
        np.testing.assert_allclose(logged[None][name], logged[False][name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("name", ["tiny_ppo", "tiny_grpo", "tiny_rloo", "tiny_reinforce"])
def test_rl_iterations_after_the_first_compile_nothing(tmp_path, monkeypatch, name):
    """Every program of an iteration (sampler, rewards, experience, update), of the held-out evaluation and of a
    checkpoint is compiled in the first iteration and its checkpoint; iterations 2..5 (with checkpoints and
    evaluations) compile nothing."""
    from jax import monitoring

    experiment = get_experiment(name)
    # the rollout generated 4 sequences at a time: the chunks share one program too
    stage = dataclasses.replace(experiment.stages[0], max_steps=5, eval_every=2, generation_batch_size=4)
    experiment = dataclasses.replace(experiment, stages=(stage,),
                                     data=dataclasses.replace(experiment.data, eval_fraction=0.05),
                                     checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1))
    compiles_at_log: dict[int, int] = {}
    compiles = []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    class CountingLogger(MetricsLogger):
        def log(self, step, metrics):
            compiles_at_log[step] = len(compiles)
            return super().log(step, metrics)

    compiles_after_save: dict[int, int] = {}

    class CountingCheckpointer(common.Checkpointer):
        def save(self, step, *args, **kwargs):
            saved = super().save(step, *args, **kwargs)
            compiles_after_save.setdefault(step, len(compiles))
            return saved

    monitoring.register_event_duration_secs_listener(count)
    monkeypatch.setattr(common, "MetricsLogger", CountingLogger)
    # the first checkpoint compiles the programs that gather the layers' weights for it (unless an earlier test
    # in this process compiled them): counted from after it
    monkeypatch.setattr(common, "Checkpointer", CountingCheckpointer)
    try:
        _run_stage(experiment, stage.name, tmp_path)
    finally:
        monitoring.unregister_event_duration_listener(count)
    assert sorted(compiles_at_log) == [0, 1, 2, 3, 4, 5]
    assert compiles_at_log[1] > compiles_at_log[0] > 0  # the counter does count compilations
    assert compiles_at_log[5] == compiles_after_save[1], (compiles_at_log, compiles_after_save)


def _lora_stage(name: str, **changes):
    """A tiny RL experiment whose stage trains rank-4 adapters on every attention and MLP projection."""
    from rlhf_jax.config import LoRAConfig

    experiment = get_experiment(name)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn", "mlp"))
    stage = dataclasses.replace(experiment.stages[0], lora=lora, **changes)
    return dataclasses.replace(experiment, stages=(stage,)), stage


@pytest.mark.parametrize("name", ["tiny_grpo", "tiny_ppo"])
def test_lora_rl_trains_adapters_only_and_the_reference_is_the_base(tmp_path, monkeypatch, name):
    """LoRA in an RL stage: the base weights are bit-identical after training; the train state holds
    adapters (and, for PPO's critic, its head) and their optimizer state only; the reference is the very
    arrays of the policy's base (no bytes of its own); the exported model is the base with the adapters merged,
    and it differs from the base (the adapters learned)."""
    from rlhf_jax.models.lora import merged_params, nbytes
    from rlhf_jax.stages import rl as rl_stage

    experiment, stage = _lora_stage(name, max_steps=3)
    if name == "tiny_grpo":  # a KL term: the reference is run
        stage = dataclasses.replace(stage, algorithm=dataclasses.replace(stage.algorithm, kl_coef=0.05))
        experiment = dataclasses.replace(experiment, stages=(stage,))
    seen = {}
    real_load, real_reference = rl_stage.load_rollouts, rl_stage._reference
    monkeypatch.setattr(rl_stage, "load_rollouts", lambda *a: seen.setdefault("rollouts", real_load(*a)))
    monkeypatch.setattr(rl_stage, "_reference", lambda *a: seen.setdefault("reference", real_reference(*a)))
    real_fit = rl_stage.fit
    monkeypatch.setattr(rl_stage, "fit", lambda **kw: seen.setdefault("fit", real_fit(**kw)))
    stage_dir = _run_stage(experiment, stage.name, tmp_path)
    rollouts, reference, (state, _) = seen["rollouts"], seen["reference"], seen["fit"]
    fresh = common.load_role(experiment, stage.policy, lambda source: source)
    _assert_same_params(fresh.params, rollouts.base)  # the base never moved
    assert jax.tree.leaves(reference)[0] is jax.tree.leaves(rollouts.base)[0]  # the reference is the base
    assert {id(x) for x in jax.tree.leaves(reference)} <= {id(x) for x in jax.tree.leaves(rollouts.base)}
    policy_state = state.states[0]
    names = {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(policy_state.params)[0]}
    assert names == {"lora_a", "lora_b"}
    base_bytes = nbytes(rollouts.base)
    assert nbytes(policy_state.params) < 0.2 * base_bytes
    # Adam: two moments per adapter scalar, nothing for the base
    assert nbytes(policy_state.opt_state) < 2 * nbytes(policy_state.params) + 4096
    if name == "tiny_ppo":
        critic_names = {str(path[0].key) for path, _ in jax.tree_util.tree_flatten_with_path(state.states[1].params)[0]}
        assert critic_names == {"backbone", "head"}  # adapters under the backbone, the whole head
        assert nbytes(state.states[1].params) < 0.2 * base_bytes
    exported = load_artifact(stage_dir / "model").params
    _assert_same_params(merged_params(rollouts.base, policy_state.params, stage.lora), exported)
    kernel = lambda params: np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"])  # noqa: E731
    assert np.abs(kernel(exported) - kernel(fresh.params)).max() > 0
    assert read_metrics(stage_dir)[-1]["step"] == 3


@pytest.mark.slow
def test_lora_grpo_killed_mid_run_resumes_exactly(tmp_path, monkeypatch):
    """A LoRA GRPO stage stopped after iteration 2 and relaunched ends with the uninterrupted run's merged
    model and metrics; its checkpoints hold the adapters, not the base."""
    from rlhf_jax.training.checkpoint import Checkpointer

    experiment, stage = _lora_stage("tiny_grpo", max_steps=4)
    experiment = dataclasses.replace(experiment, checkpoint=dataclasses.replace(experiment.checkpoint, every_steps=1))
    full, resumed = _full_then_killed_and_resumed(experiment, stage.name, tmp_path, monkeypatch, kill_after=2)
    strip = lambda records: [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "throughput/"))}  # noqa: E731
                             for r in records]
    assert strip(read_metrics(resumed)) == strip(read_metrics(full))
    checkpoints = Checkpointer(full / "checkpoints")
    saved = sum(f.stat().st_size for f in (full / "checkpoints").rglob("*") if f.is_file())
    model = sum(f.stat().st_size for f in (full / "model").rglob("*") if f.is_file())
    assert checkpoints.latest_step() == 4 and saved < model  # adapters and their moments, not the base


@pytest.mark.parametrize("kind", ["rm", "dpo"])
def test_lora_reward_and_dpo_stages_train_adapters_and_write_the_merged_model(tmp_path, kind):
    """RM and DPO with LoRA: only the targeted kernels change in the written model (merged adapters), the
    untargeted weights (embeddings, norms, un-targeted projections) are the source's, bit for bit; RM's head
    trains whole."""
    from rlhf_jax.config import LoRAConfig

    lora = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn/q_proj", "self_attn/v_proj"))
    if kind == "rm":
        experiment = get_experiment("tiny_pipeline")
        stage = dataclasses.replace(experiment.stage("rm"), model="tiny:smollm2", learning_rate=1e-2, max_steps=4,
                                    lora=lora)
    else:
        experiment = get_experiment("tiny_dpo")
        stage = dataclasses.replace(experiment.stages[0], learning_rate=1e-2, max_steps=4, lora=lora)
    experiment = dataclasses.replace(experiment, stages=(stage,))
    stage_dir = _run_stage(experiment, stage.name, tmp_path)
    _, lm_params, _ = load("tiny:smollm2")
    model = load_artifact(stage_dir / "model", with_tokenizer=False).params
    trained = model["backbone"] if kind == "rm" else model
    for module in ("k_proj", "o_proj"):  # not targeted: untouched
        _assert_same_params(lm_params["layers"]["self_attn"][module], trained["layers"]["self_attn"][module])
    _assert_same_params(lm_params["embed_tokens"], trained["embed_tokens"])
    for module in ("q_proj", "v_proj"):  # targeted: W + s a b, and b learned
        assert np.abs(np.asarray(trained["layers"]["self_attn"][module]["kernel"])
                      - np.asarray(lm_params["layers"]["self_attn"][module]["kernel"])).max() > 0
    if kind == "rm":
        assert np.any(np.asarray(model["head"]["kernel"]) != 0)
    assert np.isfinite(read_metrics(stage_dir)[-1]["rm/loss" if kind == "rm" else "dpo/loss"])
