"""``python -m rlhf_jax.data check PATH``: count valid records, list bad ones, measure token lengths.

Exit status: 0; 1 under ``--strict`` when any record is bad, or when no record is valid; 2 for bad usage or
an unreadable file (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.formats import FORMATS
from rlhf_jax.data.records import KINDS
from rlhf_jax.data.sources import read_records
from rlhf_jax.data.tokenize import TokenizeConfig, load_tokenizer, token_ids, truncate, validate_tokenize_config
from rlhf_jax.errors import ArgumentParser, UserError



def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m rlhf_jax.data", description="Check a data file before training on it.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    check = commands.add_parser("check", help="validate a data file and report its records")
    check.add_argument("path", help="data file or directory")
    check.add_argument("--type", dest="kind", choices=KINDS, default="preference", help="record type")
    check.add_argument("--format", choices=FORMATS, default="auto", help="file format (default: from the name)")
    check.add_argument("--split", help="split of a datasets/TFDS directory (default: train)")
    check.add_argument("--tokenizer", help="gguf:PACKAGE, a .gguf file or a tokenizer directory")
    check.add_argument("--max-length", type=int, help="token budget of prompt + response (default 1024)")
    check.add_argument("--max-prompt-length", type=int, help="token budget of the prompt (default max-length / 2)")
    check.add_argument("--raw-text", action="store_true", help="tokenize raw text, not the chat template")
    check.add_argument("--strict", action="store_true", help="exit 1 if any record is bad")
    return parser


def check(args: argparse.Namespace) -> int:
    if args.tokenizer is None and (args.max_length or args.max_prompt_length or args.raw_text):
        raise UserError("--max-length, --max-prompt-length and --raw-text need --tokenizer")
    max_length = args.max_length or 1024
    config = TokenizeConfig(max_length=max_length, max_prompt_length=args.max_prompt_length or max_length // 2,
                            chat_template=not args.raw_text)
    validate_tokenize_config(config)
    records, report = read_records(args.path, args.kind, format=args.format, split=args.split, check=False)
    print(report.summary())
    for problem in report.problems:
        print(f"  {problem}")
    if records and args.tokenizer:
        print(_length_report(records, load_tokenizer(args.tokenizer), config))
    if report.valid == 0:
        print(f"error: no valid {args.kind} records", file=sys.stderr)
        return 1
    return 1 if args.strict and report.problems else 0


def _length_report(records, tokenizer, config: TokenizeConfig) -> str:
    ids = token_ids(records, tokenizer, config)
    columns = {"prompt": [len(prompt) for prompt, _ in ids]}
    sides = {1: ["response"], 2: ["chosen", "rejected"]}.get(len(ids[0][1]), [])
    for side, name in enumerate(sides):
        columns[name] = [len(responses[side]) for _, responses in ids]
    if sides:
        columns["total"] = [len(prompt) + max(map(len, responses)) for prompt, responses in ids]
    lines = [f"token lengths ({'raw text' if not config.chat_template else 'chat template'}, end-of-turn included):",
             f"  {'':9}{'min':>7}{'mean':>9}{'median':>8}{'p95':>8}{'max':>7}"]
    for name, values in columns.items():
        v = np.asarray(values)
        lines.append(f"  {name:9}{v.min():7d}{v.mean():9.1f}{np.median(v):8.0f}{np.percentile(v, 95):8.0f}{v.max():7d}")
    prompt_cut = sum(len(prompt) > config.max_prompt_length for prompt, _ in ids)
    cut = sum(truncate(prompt, responses, config.max_prompt_length, config.max_length)[2] for prompt, responses in ids)
    lines.append(f"truncation (max_length={config.max_length}, max_prompt_length={config.max_prompt_length}) "
                 f"would cut {cut} of {len(ids)} records ({prompt_cut} prompts)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return check(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
