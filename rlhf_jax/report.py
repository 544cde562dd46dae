"""Run reports: one self-contained HTML page of a run's curves, final metrics and samples.

    python -m rlhf_jax.report runs/try1                    # -> runs/try1/report.html, runs/try1/report/*.png
    python -m rlhf_jax.report runs/try1 --out /tmp/try1.html   # PNGs in /tmp/try1/

For each stage of ``<run_dir>/config.json``, in order: its status (done, in progress, not started), the
curves of the metrics it logged (``metrics.jsonl``; a plot is drawn only when its metrics are there), the
reward-against-KL view of RL stages, its final metrics (``summary.json``, ``evaluation.json``), a
before/after table of evaluate stages with a ``baseline``, and sample tables (PPO ``samples.jsonl``,
evaluate samples, generate ``generations.jsonl``). Images are inline PNG data URIs: the page needs no
other file. A run partway through has a report too: missing stages say so. A missing directory, or one
without the run's ``config.json``, prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import html
import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple, Sequence

from rlhf_jax.errors import UserError

EXIT_USER_ERROR = 2
RL_KINDS = ("ppo", "grpo", "rloo", "reinforce", "raft", "rest")  # x axis: iterations (one rollout batch each), not optimizer steps
SAMPLE_ROWS = 4  # per table (per end of a PPO stage)
PROMPT_CHARS = 400  # prompts keep their last characters: the latest turns


class Curve(NamedTuple):
    """One figure of `metrics` against step; `held_out` are summary.json values drawn at the last step."""
    name: str
    title: str
    ylabel: str
    metrics: tuple[str, ...]
    held_out: tuple[str, ...] = ()


CURVES = (
    Curve("sft_loss", "SFT loss", "cross-entropy (nats per token)", ("sft/loss",), ("eval/loss",)),
    Curve("rm_loss", "Reward-model loss", "pairwise loss (nats per pair)", ("rm/loss",)),
    Curve("rm_accuracy", "Reward-model accuracy", "fraction of pairs ranked right", ("rm/accuracy",),
          ("eval/accuracy",)),
    Curve("rm_margin", "Reward-model margin and rewards", "reward (RM score units)",
          ("rm/margin", "rm/chosen_reward", "rm/rejected_reward"), ("eval/margin",)),
    Curve("dpo_loss", "DPO loss", "loss (nats per pair)", ("dpo/loss",), ("eval/dpo/loss",)),
    Curve("dpo_accuracy", "DPO implicit-reward accuracy", "fraction of pairs ranked right",
          ("rewards/accuracies",), ("eval/rewards/accuracies",)),
    Curve("dpo_rewards", "DPO implicit rewards", "β · log-ratio (nats)",
          ("rewards/margins", "rewards/chosen", "rewards/rejected"), ("eval/rewards/margins",)),
    Curve("policy_loss", "Policy loss", "clipped surrogate loss (advantage units)", ("policy/loss",)),
    Curve("value_loss", "Value loss", "squared error (reward² units)", ("value/loss",)),
    Curve("reward", "Reward of the rollouts", "reward (score units per response)",
          ("reward/mean", "reward/total")),
    Curve("held_out_reward", "Held-out reward, greedy (for an exact-answer reward: accuracy)",
          "mean reward per held-out prompt", ("eval/reward_mean",)),
    Curve("kl", "KL to the reference", "KL (nats per response)", ("kl/mean",)),
    Curve("kl_coef", "KL coefficient", "β (reward units per nat)", ("kl/coef",)),
    Curve("policy_stats", "Policy update statistics", "fraction of tokens / nats per token",
          ("policy/clipfrac", "policy/approx_kl")),
    Curve("length", "Response length", "tokens per response", ("response/length_mean",)),
    Curve("eos", "Responses that ended with EOS", "fraction of responses", ("response/eos_fraction",)),
)
REWARD_NAMES, KL_NAME = ("reward/score", "reward/mean"), "kl/mean"  # over-optimisation: RM score against KL


# ---- reading a run --------------------------------------------------------------------------------------


def _number(value) -> float | None:
    """A metric as a float ("nan"/"inf" strings are how MetricsLogger writes non-finite ones), else None."""
    try:
        return None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or being written by a stage that is running


def _json_lines(path: Path, stepped: bool = False) -> list[dict]:
    """The JSON objects of a JSON-lines file (with an integer "step" if `stepped`); [] when absent."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return [r for r in records if isinstance(r, dict) and (not stepped or isinstance(r.get("step"), int))]


def _metrics(stage_dir: Path) -> list[dict]:
    """Records by step, the last of each step kept (a resumed stage logs its steps again)."""
    by_step = {record["step"]: record for record in _json_lines(stage_dir / "metrics.jsonl", stepped=True)}
    return [by_step[step] for step in sorted(by_step)]


def _series(records: list[dict], name: str) -> tuple[list[float], list[float]]:
    points = [(record["step"], _number(record.get(name))) for record in records]
    points = [(step, value) for step, value in points if value is not None and math.isfinite(value)]
    return [step for step, _ in points], [value for _, value in points]


# ---- figures ---------------------------------------------------------------------------------------------


def _png(figure) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _axes(title: str, xlabel: str, ylabel: str, integer_x: bool = True):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 3.6), layout="constrained")
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=integer_x))
    return figure, axes


def _curve(curve: Curve, records: list[dict], summary: dict, xlabel: str) -> bytes | None:
    lines = [(name, *_series(records, name)) for name in curve.metrics]
    lines = [line for line in lines if line[1]]
    if not lines:
        return None
    figure, axes = _axes(curve.title, xlabel, curve.ylabel)
    for name, steps, values in lines:
        axes.plot(steps, values, marker="o" if len(steps) <= 50 else None, markersize=3, label=name)
    last_step = max(step for _, steps, _ in lines for step in steps)
    for name in curve.held_out:
        value = _number(summary.get(name))
        if value is not None and math.isfinite(value):
            axes.plot([last_step], [value], marker="*", markersize=12, linestyle="none", label=f"{name} (held out)")
    axes.legend(fontsize="small")
    return _png(figure)


def _reward_against_kl(records: list[dict]) -> bytes | None:
    from matplotlib.ticker import MaxNLocator

    reward_name = next((name for name in REWARD_NAMES if _series(records, name)[0]), None)
    points = [(r["step"], _number(r.get(KL_NAME)), _number(r.get(reward_name))) for r in records]
    points = [point for point in points if None not in point and math.isfinite(point[1] + point[2])]
    if not points:
        return None
    steps, kls, values = zip(*points)
    figure, axes = _axes("Reward against KL (over-optimisation)", f"{KL_NAME} (nats per response)",
                         f"{reward_name} (score units)", integer_x=False)
    axes.plot(kls, values, color="0.7", linewidth=1, zorder=1)
    dots = axes.scatter(kls, values, c=steps, cmap="viridis", s=20, zorder=2)
    figure.colorbar(dots, ax=axes, label="iteration", ticks=MaxNLocator(nbins=6, integer=True))
    return _png(figure)


# ---- HTML ------------------------------------------------------------------------------------------------


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):  # chat messages
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _table(header: Sequence[str], rows: list[Sequence], css: str = "") -> str:
    head = "".join(f"<th>{html.escape(column)}</th>" for column in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_text(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>'


def _prompt(prompt) -> str:
    text = _text(prompt).strip()
    return text if len(text) <= PROMPT_CHARS else "…" + text[-PROMPT_CHARS:]


def _status(stage_dir: Path) -> str:
    if (stage_dir / "DONE").exists():
        finished = (_json(stage_dir / "DONE") or {}).get("finished")
        return f"done{f', finished {finished}' if finished else ''}"
    return "in progress (no DONE marker yet)" if stage_dir.is_dir() else "not started"


def _final_metrics(stage_dir: Path) -> tuple[list, list]:
    """(name, value) rows, and (name, before, after, change) rows of an evaluate stage with a baseline."""
    summary = _json(stage_dir / "summary.json")
    if not isinstance(summary, dict):  # a generate stage: its DONE marker counts what it wrote
        summary = _json(stage_dir / "evaluation.json") or _json(stage_dir / "DONE") or {}
    rows = [(name, value) for name, value in summary.items() if _number(value) is not None
            and not isinstance(value, str) and not name.endswith(("/before", "/after", "/change"))]
    compared = [(base, *(summary.get(f"{base}/{column}") for column in ("before", "after", "change")))
                for base in (name.removesuffix("/before") for name in summary if name.endswith("/before"))]
    return rows, compared


def _samples(stage_dir: Path, baseline_dir: Path | None) -> str:
    ppo = _json_lines(stage_dir / "samples.jsonl", stepped=True)
    if ppo:
        steps = sorted({min(r["step"] for r in ppo), max(r["step"] for r in ppo)})  # before and after
        rows = [(r["step"], _prompt(r.get("prompt")), r.get("response"), r.get("reward"))
                for step in steps for r in [r for r in ppo if r["step"] == step][:SAMPLE_ROWS]]
        return (f"<h3>Samples at iteration{'s' * (len(steps) > 1)} {' and '.join(map(str, steps))}</h3>"
                + _table(("iteration", "prompt", "response", "reward"), rows, "samples"))
    evaluation = _json(stage_dir / "evaluation.json")
    if isinstance(evaluation, dict) and evaluation.get("samples"):
        baseline = (_json(baseline_dir / "evaluation.json") if baseline_dir else None) or {}
        before = {_text(s.get("prompt")): s for s in baseline.get("samples") or []}  # the same held-out prompts
        if before:
            rows = [(_prompt(s.get("prompt")), *(before.get(_text(s.get("prompt")), {}).get(key)
                                                 for key in ("response", "reward")), s.get("response"),
                     s.get("reward")) for s in evaluation["samples"]]
            header = ("prompt", f"response before ({baseline_dir.name})", "reward before", "response after",
                      "reward after")
            return "<h3>Samples before and after</h3>" + _table(header, rows, "samples")
        rows = [(_prompt(s.get("prompt")), s.get("response"), s.get("reward")) for s in evaluation["samples"]]
        return "<h3>Samples</h3>" + _table(("prompt", "response", "reward"), rows, "samples")
    generations = _json_lines(stage_dir / "generations.jsonl")[: 2 * SAMPLE_ROWS]
    if generations:
        rows = [(_prompt(g.get("prompt_text") or g.get("prompt")), g.get("completion"), g.get("finish_reason"))
                for g in generations]
        return "<h3>Generations</h3>" + _table(("prompt", "response", "finish"), rows, "samples")
    return ""


def _stage_section(run_dir: Path, name: str, kind: str, baseline: str | None, images: Path) -> str:
    stage_dir = run_dir / name
    records = _metrics(stage_dir)
    summary = _json(stage_dir / "summary.json") or {}
    xlabel = "iteration (rollout batches)" if kind in RL_KINDS else "step (optimizer updates)"
    figures = [(curve.name, _curve(curve, records, summary, xlabel)) for curve in CURVES]
    figures.append(("reward_vs_kl", _reward_against_kl(records)))
    parts = [f'<section><h2>{html.escape(name)} <small>({html.escape(kind)})</small></h2>',
             f'<p class="status">{html.escape(_status(stage_dir))}</p>']
    pictures = []
    for figure_name, png in figures:
        if png is None:
            continue
        (images / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_{figure_name}.png").write_bytes(png)
        pictures.append(f'<img alt="{html.escape(f"{name}: {figure_name}")}" '
                        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    if pictures:
        parts.append('<div class="plots">' + "".join(pictures) + "</div>")
    rows, compared = _final_metrics(stage_dir)
    if compared:
        parts.append(f"<h3>Before ({html.escape(baseline or 'baseline')}) and after</h3>"
                     + _table(("metric", "before", "after", "change"), compared))
    if rows:
        parts.append("<h3>Final metrics</h3>" + _table(("metric", "value"), rows))
    samples = _samples(stage_dir, run_dir / baseline if baseline else None)
    parts.append(samples)
    if not (pictures or rows or compared or samples):
        parts.append(f"<p>No data for stage {html.escape(name)} yet.</p>")
    return "\n".join(parts) + "</section>"


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;vertical-align:top}
th{background:#f3f3f3}td{font-variant-numeric:tabular-nums}
table.samples td{white-space:pre-wrap;max-width:40em;font-size:90%}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:8px}
.plots img{width:100%;border:1px solid #eee}
section{margin-top:2em;border-top:2px solid #ddd}.status{color:#555}"""


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default `<run_dir>/report.html`) and its PNGs beside it (in
    `<out without .html>/`, so `<run_dir>/report/`); returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    config = _json(run_dir / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("stages"), list):
        raise UserError(f"{run_dir}: not a run directory (no readable config.json with stages)")
    stages = [(stage["name"], stage.get("kind", "?")) for stage in config["stages"]]
    baselines = {stage["name"]: stage.get("baseline") for stage in config["stages"]}
    out = Path(out) if out is not None else run_dir / "report.html"
    images = out.with_suffix("") if out.suffix else out.with_name(out.name + "_files")
    images.mkdir(parents=True, exist_ok=True)
    for old in images.glob("*.png"):  # figures of metrics that are gone must not linger
        old.unlink()
    title = f"Run report: {config.get('name', run_dir.name)}"
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    overview = _table(("stage", "kind", "status"), [(n, k, _status(run_dir / n)) for n, k in stages])
    sections = [_stage_section(run_dir, name, kind, baselines.get(name), images) for name, kind in stages]
    page = (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>{html.escape(config.get('description') or '')}</p>"
            f"<p>Run directory <code>{html.escape(str(run_dir.resolve()))}</code>; report written {now}.</p>\n"
            + overview + "\n" + "\n".join(sections) + "\n</body></html>\n")
    partial = out.with_name(out.name + ".partial")  # a reader never sees half a page
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory (the run_dir= of `python -m rlhf_jax.launch`)")
    parser.add_argument("--out", metavar="PATH", help="the HTML file to write (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir, args.out)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
