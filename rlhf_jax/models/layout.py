"""The two layouts of the decoder's layer weights.

Stacked (the canonical layout): under the `LAYERS` key, every layer's weights on a leading layer axis, as
`nn.scan` keeps them; checkpoints, exported weights and the sharding rules use it. Per layer: under the same key,
a tuple of one subtree per layer. A program over an unrolled decoder (`llama.layers_unrolled`) that takes the
stack copies each layer's weights out of it (XLA has no views of slices) and copies each layer's gradient back
into a stack; taking one array per layer, it copies neither (`training.accumulate`, `training.state`).

`stack_layers` and `unstack_layers` convert any pytree holding the key (params, Adam's moments, a train state)
and leave a subtree already in the asked layout as it is. Under `jit`, slicing layer i out of a stack that the
same program built from per-layer arrays gives back the array itself: XLA copies nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

LAYERS = "layers"  # the key of the decoder's layers (`models.llama.Decoder`'s `nn.scan`)


def _is_namedtuple(tree: Any) -> bool:
    return isinstance(tree, tuple) and hasattr(tree, "_fields")


def at_layers(fn: Callable[[Any, Any], Any], tree: Any, like: Any = None) -> Any:
    """`tree` with every subtree under a `LAYERS` key replaced by fn(subtree, like's subtree there); dicts,
    tuples, lists, named tuples (optax states) and dataclasses (a train state) are searched. `like` (optional):
    a tree of the same containers, e.g. the abstract state a checkpoint restores into."""
    def at(tree, like):
        if isinstance(tree, dict):
            return {key: (fn(value, _get(like, key)) if key == LAYERS else at(value, _get(like, key)))
                    for key, value in tree.items()}
        if _is_namedtuple(tree):
            return type(tree)(*(at(value, _index(like, i)) for i, value in enumerate(tree)))
        if isinstance(tree, (tuple, list)):
            return type(tree)(at(value, _index(like, i)) for i, value in enumerate(tree))
        if dataclasses.is_dataclass(type(tree)):  # the class: a traced array answers any attribute
            names = [field.name for field in dataclasses.fields(tree)
                     if field.init and field.metadata.get("pytree_node", True)]
            return dataclasses.replace(tree, **{name: at(getattr(tree, name), getattr(like, name, None))
                                                for name in names})
        return tree

    return at(tree, like)


def _get(like, key):
    return like.get(key) if isinstance(like, dict) else None


def _index(like, i):
    return like[i] if isinstance(like, (tuple, list)) and i < len(like) else None


def is_per_layer(layers: Any) -> bool:
    """Whether a `LAYERS` subtree is in the per-layer layout (a tuple of per-layer subtrees)."""
    return isinstance(layers, tuple) and not _is_namedtuple(layers)


def has_per_layer(tree: Any) -> bool:
    """Whether any `LAYERS` subtree of `tree` is per layer."""
    found = []
    at_layers(lambda layers, _: found.append(is_per_layer(layers)), tree)
    return any(found)


def _split(stacked: Any) -> Any:
    leaves = jax.tree.leaves(stacked)
    if is_per_layer(stacked) or not leaves:
        return stacked
    return tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(leaves[0].shape[0]))


def unstack_layers(tree: Any) -> Any:
    """`tree` with every stacked `LAYERS` subtree replaced by a tuple of per-layer subtrees; other leaves kept."""
    return at_layers(lambda layers, _: _split(layers), tree)


def stack_layers(tree: Any) -> Any:
    """The inverse of :func:`unstack_layers`: every per-layer `LAYERS` subtree stacked on a leading axis."""
    def join(layers, _):
        return jax.tree.map(lambda *each: jnp.stack(each), *layers) if is_per_layer(layers) else layers

    return at_layers(join, tree)


def stack_abstract(tree: Any) -> Any:
    """:func:`stack_layers` of a tree of `jax.ShapeDtypeStruct`s, each stacked leaf keeping its layers' sharding
    (a mesh's spec with the layer axis replicated)."""
    def stacked(*each):
        first = each[0]
        sharding = first.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(each), *first.shape), first.dtype, sharding=sharding)

    return at_layers(lambda layers, _: jax.tree.map(stacked, *layers) if is_per_layer(layers) else layers, tree)


def unstack_like(tree: Any, like: Any) -> Any:
    """`tree` (stacked) with the `LAYERS` subtrees that are per layer in `like` unstacked: a canonical
    checkpoint brought back into the layout of the state it restores."""
    return at_layers(lambda layers, layout: _split(layers) if is_per_layer(layout) else layers, tree, like)
