"""rlhf_jax: RLHF for JAX/Flax (SFT -> reward model -> PPO, and the RL-free alternatives)."""

__version__ = "0.1.0"
