"""The file formats the data layer reads: the one list behind `read_records`, `python -m rlhf_jax.data check`
and the launcher's `data.format` / `prompts_format` (`rlhf_jax.config.DataFormat`).

Standard library only: the launcher's config imports it and must start without numpy.
"""

FORMATS = (
    "auto",  # from the file name or the directory's contents
    "jsonl",  # one JSON object a line, plain or gzip
    "hh",  # JSONL whose rows are HH-RLHF {chosen, rejected} dialogues
    "json",  # one JSON array of objects
    "parquet",  # a Parquet file
    "arrow",  # a directory written by `datasets` save_to_disk
    "tfds",  # a prepared TFDS dataset in array_record format
)
