"""Each config enum names exactly the components of the table it selects from.

A component added to a table without its enum value (so no config can select it), or an enum value with no
component (so a validated config fails at run time), fails here. Enums dispatched by ``if``/``elif`` only
(``KLPlacement``, in ``rlhf_jax.trainers.rl``) have no table to compare with.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp

from rlhf_jax import evaluate, losses, rewards, stages
from rlhf_jax.config import (
    DTYPES,
    LLAMA2_SIZES,
    STAGE_TYPES,
    TINY_ARCHITECTURES,
    AdvantageEstimator,
    DataFormat,
    KLEstimator,
    KTOLoss,
    LossAggregation,
    OptimizerName,
    PreferenceLoss,
    RematPolicy,
    RLAlgorithm,
    Schedule,
    SourceKind,
    StageKind,
)
from rlhf_jax.config.experiment import _CHECKS
from rlhf_jax.config.preference import preference_loss_table
from rlhf_jax.data.formats import FORMATS
from rlhf_jax.models.config import LLAMA2_PRESETS, TINY_PRESETS
from rlhf_jax.training.state import OPTIMIZERS, SCHEDULES


def values(enum_class) -> set[str]:
    return {member.value for member in enum_class}


def test_stage_kinds_are_the_runners_the_stage_classes_and_their_checks():
    assert values(StageKind) == set(stages.RUNNERS)
    assert set(STAGE_TYPES) == set(StageKind)
    assert all(cls.kind is kind for kind, cls in STAGE_TYPES.items())
    assert set(_CHECKS) == set(STAGE_TYPES.values())  # every stage class is validated, and only those


def test_advantage_estimators_are_the_losses_estimators():
    assert values(AdvantageEstimator) == set(losses.ADVANTAGE_ESTIMATORS) | set(losses.CRITIC_ESTIMATORS)
    with_critic = {e.value for e in AdvantageEstimator if RLAlgorithm(advantage_estimator=e).has_critic}
    assert with_critic == set(losses.CRITIC_ESTIMATORS)


def test_kl_estimators_are_the_losses_estimators():
    assert values(KLEstimator) == set(losses.KL_ESTIMATORS)


def test_loss_aggregations_are_the_aggregation_modes():
    assert values(LossAggregation) == set(losses.AGGREGATION_MODES)


def test_every_preference_loss_field_is_a_keyword_of_some_loss_and_every_keyword_a_field():
    # `PreferenceLoss.type` names the loss table's entries directly (no enum copy); the config reads each entry's
    # keywords from the table, so what must agree is the set of fields with the set of keywords
    read = set().union(*(losses.preference_hyperparameters(name) for name in losses.PREFERENCE_LOSSES))
    fields = {field.name for field in dataclasses.fields(PreferenceLoss)}
    assert read | {"type", "nll_coef"} == fields
    assert set(preference_loss_table()) == set(losses.PREFERENCE_LOSSES)
    assert {name for name, (_, needs) in preference_loss_table().items() if needs} == {"sigmoid", "hinge", "ipo"}


def test_kto_loss_fields_are_the_kto_loss_functions_keywords():
    parameters = inspect.signature(losses.kto_per_example).parameters
    keywords = {name: p.default for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and name != "mask"}
    fields = {field.name: field.default for field in dataclasses.fields(KTOLoss)}
    assert set(fields) == set(keywords)  # the step passes the config's fields by name
    assert all(keywords[name] in (inspect.Parameter.empty, default) for name, default in fields.items())


def test_optimizers_and_schedules_are_the_ones_make_optimizer_builds():
    assert values(OptimizerName) == set(OPTIMIZERS)
    assert values(Schedule) == set(SCHEDULES)


def test_remat_policies_are_jax_checkpoint_policies():
    # jax has more policies than we offer: each of ours must be one (`getattr(jax.checkpoint_policies, name)`)
    assert all(callable(getattr(jax.checkpoint_policies, policy, None)) for policy in values(RematPolicy))


def test_data_formats_are_the_data_layers_formats():
    assert values(DataFormat) == set(FORMATS)


def test_source_kinds_are_the_loaders_and_the_rewards_prefixes():
    loaded = set(evaluate.LOAD_SPEC_PREFIXES)  # what `rlhf_jax.models.load` reads besides a path
    reward_prefixes = {rewards.SPEC_PREFIX.rstrip(":"), rewards.TEXT_SPEC_PREFIX.rstrip(":")}
    resolved_by_the_config = {SourceKind.PATH.value, SourceKind.STAGE.value}
    assert values(SourceKind) == loaded | reward_prefixes | resolved_by_the_config
    assert {SourceKind.FUNCTION.value, SourceKind.TEXT.value} == reward_prefixes


def test_model_presets_are_the_models_presets():
    assert set(TINY_ARCHITECTURES) == set(TINY_PRESETS)
    assert set(LLAMA2_SIZES) == set(LLAMA2_PRESETS)
    assert all(jnp.issubdtype(jnp.dtype(name), jnp.floating) for name in DTYPES)  # what `models.load` accepts


def test_the_model_sharding_sampling_and_loss_layers_import_no_launcher_config():
    # they take plain values or any object with the fields they read (models.lora.LoRASettings,
    # sharding.mesh.MeshAxes); the launcher's config package sits above them
    import subprocess
    import sys

    code = ("import sys; import rlhf_jax.models, rlhf_jax.models.lora, rlhf_jax.sharding, rlhf_jax.sampling, "
            "rlhf_jax.losses, rlhf_jax.judge; print(sorted(m for m in sys.modules if m.startswith('rlhf_jax.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
