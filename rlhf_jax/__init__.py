"""rlhf_jax: RLHF for JAX/Flax (SFT -> reward model -> PPO, and the RL-free alternatives)."""

import os

# transformers (used here for tokenizers only) advises installing PyTorch on every import when it is absent,
# which the base install is by design; a user's own setting wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
