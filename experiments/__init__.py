"""The built-in experiments. Importing this package registers them (see rlhf_jax.registry).

Run one with ``python -m rlhf_jax.launch experiment=NAME``; list them with ``--list``.
"""

from experiments import arithmetic, feedback, llama2, preference, smollm2, tiny  # noqa: F401  (imported to register)
