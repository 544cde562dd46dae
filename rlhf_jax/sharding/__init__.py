"""Device mesh, logical-axis sharding rules, and sharded steps (see docs/sharding.md).

    mesh = make_mesh(experiment.mesh)                 # ("data", "fsdp", "tensor"), before compiling
    validate_mesh_for_model(decoder_config, mesh)
    shardings = state_shardings(state, mesh)          # params FSDP/tensor-sharded, opt state alike
    state = place_state(state, shardings)
    step = shard_train_step(train_step, shardings, mesh)
    # or, both at once: (state,), step = place_for_training(train_step, (state,), mesh)
    state, metrics = step(state, place_batch(numpy_batch, mesh))
"""

from rlhf_jax.sharding.mesh import MESH_AXES, activation_rules, make_mesh, mesh_shape, use_mesh
from rlhf_jax.sharding.partition import (DEFAULT_RULES, PARAM_AXES, logical_axes_for, logical_to_mesh_spec,
                                         opt_state_shardings, param_logical_axes, param_shardings, replicated,
                                         state_shardings, validate_mesh_for_model)
from rlhf_jax.sharding.placement import (batch_axes, batch_sharding, batch_shards, move_to_memory, place_batch,
                                         place_for_training, place_state, shard_train_step, stacked_batch_sharding,
                                         supports_host_offload)

__all__ = [
    "DEFAULT_RULES", "MESH_AXES", "PARAM_AXES", "activation_rules", "batch_axes", "batch_sharding", "batch_shards",
    "logical_axes_for", "logical_to_mesh_spec", "make_mesh", "mesh_shape", "move_to_memory", "opt_state_shardings",
    "param_logical_axes", "param_shardings", "place_batch", "place_for_training", "place_state", "replicated",
    "shard_train_step", "stacked_batch_sharding",
    "state_shardings", "supports_host_offload", "use_mesh", "validate_mesh_for_model",
]
