"""Batched KV-cache sampling: `generate` (pure, jittable) and `Sampler` (bucketed, cached compiles)."""

from rlhf_jax.sampling.sampler import (
    Completion,
    Sampler,
    SamplerOutput,
    SamplingSettings,
    batch_bucket,
    generate,
    left_pad,
    packed_bucket,
    prompt_bucket,
    resolve_settings,
    sample_from_logits,
    sampling_logits,
    sampler_logprobs,
    top_k_filter,
    top_p_filter,
    validate_settings,
)

__all__ = [
    "Completion",
    "Sampler",
    "SamplerOutput",
    "SamplingSettings",
    "batch_bucket",
    "generate",
    "left_pad",
    "packed_bucket",
    "prompt_bucket",
    "resolve_settings",
    "sample_from_logits",
    "sampling_logits",
    "sampler_logprobs",
    "top_k_filter",
    "top_p_filter",
    "validate_settings",
]
