"""Run reports (`rlhf_jax.report`): a real tiny pipeline run's report, read back and rendered in headless
Chromium; evaluate stages before and after (written by the real stage writer); the command line's errors."""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import launch, registry
from rlhf_jax.report import build_report, main

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DATA_URI = "data:image/png;base64,"


def distinct_colours(png: bytes | Path) -> int:
    """How many different pixel values an image holds (1: a blank image)."""
    from matplotlib import image

    pixels = image.imread(io.BytesIO(png) if isinstance(png, bytes) else png, format="png")
    return len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny_pipeline run (SFT -> RM -> PPO with samples -> generate) and its report: one per test
    session, shared by pytest-xdist's workers (the first to take the lock runs it, the others wait)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # this session's, either way
    run_dir = shared / "report_tiny_run"
    with open(shared / "report_tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (run_dir / "report.html").exists():
            status = launch.main(["experiment=tiny_pipeline", f"run_dir={run_dir}", "logging.sample_every=1",
                                  "stages.sft.max_steps=4", "stages.rm.max_steps=4", "stages.samples.num_prompts=2"])
            assert status == 0
            assert build_report(run_dir) == run_dir / "report.html"
    return run_dir


@pytest.fixture(scope="module")
def tiny_report(tiny_run) -> Path:
    return tiny_run / "report.html"


def test_report_of_a_tiny_pipeline_run(tiny_run, tiny_report):
    page = tiny_report.read_text(encoding="utf-8")
    for stage in ("sft", "rm", "ppo", "samples"):
        assert f"<h2>{stage} <small>" in page
    pngs = {path.name: path.read_bytes() for path in (tiny_run / "report").glob("*.png")}
    expected = {"sft_sft_loss", "rm_rm_loss", "rm_rm_accuracy", "rm_rm_margin", "ppo_policy_loss", "ppo_value_loss",
                "ppo_reward", "ppo_kl", "ppo_kl_coef", "ppo_reward_vs_kl", "ppo_length", "ppo_eos"}
    assert expected <= {name.removesuffix(".png") for name in pngs}
    assert not [name for name in pngs if "dpo" in name or name.startswith("samples")]  # absent metrics: no plot
    for name, png in pngs.items():
        assert distinct_colours(png) > 50, name
    # Self-contained: every image is inline (the same bytes as the files), nothing else is loaded.
    sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
    assert len(sources) == len(pngs) and all(source.startswith(DATA_URI) for source in sources)
    assert sorted(base64.b64decode(source[len(DATA_URI):]) for source in sources) == sorted(pngs.values())
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page and "<script" not in page
    assert "Samples at iterations 1 and 2" in page and "<h3>Generations</h3>" in page
    assert "<td>train/loss</td>" in page and "<td>train_set/accuracy</td>" in page and "<td>iterations</td>" in page


def test_report_renders_in_headless_chromium(tiny_report, tmp_path):
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.fail("no Chromium on PATH to render the report: install it with `apt-get install -y chromium` "
                    "(or run scripts/install_chromium.sh)")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    tiny_report.as_uri()], capture_output=True, timeout=180)
    assert shot.exists(), "Chromium wrote no screenshot"
    assert distinct_colours(shot) > 50  # text, tables and the first plots, not a blank page


def test_out_option_writes_the_page_and_its_images_elsewhere(tiny_run, tmp_path, capsys):
    assert main([str(tiny_run), "--out", str(tmp_path / "copy.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "copy.html")
    assert (tmp_path / "copy.html").exists() and (tmp_path / "copy" / "ppo_reward_vs_kl.png").exists()


def test_evaluate_stages_before_and_after_on_a_run_partway(tmp_path, monkeypatch):
    """smollm2_hh's `before` and `after` evaluate stages, written by the real stage runner from a made-up
    evaluation; PPO is running, SFT and RM have not run."""
    import rlhf_jax.evaluate
    from rlhf_jax.config import save_config
    from rlhf_jax.stages import evaluate as evaluate_stage
    from rlhf_jax.stages import make_resolver

    experiment = dataclasses.replace(registry.get_experiment("smollm2_hh"), run_dir=str(tmp_path))
    save_config(experiment, tmp_path / "config.json")
    prompt = "\n\nHuman: Is <b>1 < 2</b> & true?\n\nAssistant:"  # evaluate_policy's samples hold prompt text

    def evaluation(reward: float, response: str) -> dict:
        values = {"raw_reward": np.array([reward, reward]), "k1": np.array([0.0, 0.2]), "k3": np.array([0.0, 0.1]),
                  "length": np.array([10, 14]), "eos": np.array([1.0, 0.0])}
        sample = {"prompt": prompt, "response": response, "response_token_ids": [1, 2], "length": 2,
                  "ended_with_eos": True, "reward": reward, "raw_reward": reward}
        return {"command": "policy", "model": "m", "prompts": 2, "reward": "r", "reference": "s",
                **rlhf_jax.evaluate.policy_metrics(values, {}), "samples": [sample]}

    for name, result in (("before", evaluation(0.25, "<script>alert(1)</script>")),
                         ("after", evaluation(1.0, "A kinder answer."))):
        monkeypatch.setattr(rlhf_jax.evaluate, "evaluate_policy", lambda args, result=result: result)
        (tmp_path / name).mkdir()
        evaluate_stage.run(experiment, experiment.stage(name), tmp_path / name, make_resolver(experiment, tmp_path))

    # PPO is running: two iterations logged, the second line being written.
    (tmp_path / "ppo").mkdir()
    (tmp_path / "ppo" / "metrics.jsonl").write_text('{"step": 1, "time": 0, "reward/mean": 0.5, "kl/mean": 0.1}\n'
                                                    '{"step": 2, "time": 0, "reward/me')
    page = build_report(tmp_path).read_text(encoding="utf-8")
    assert "<h3>Before (before) and after</h3>" in page
    assert "<tr><td>reward_mean</td><td>0.25</td><td>1</td><td>0.75</td></tr>" in page
    assert "<h3>Samples before and after</h3>" in page and "A kinder answer." in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "Is &lt;b&gt;1 &lt; 2&lt;/b&gt; &amp; true?" in page
    for stage in ("sft", "rm"):
        assert f"<p>No data for stage {stage} yet.</p>" in page
    assert page.count('<p class="status">not started</p>') == 2
    assert page.count("<img") == 3 and sorted(path.name for path in (tmp_path / "report").iterdir()) == [
        "ppo_kl.png", "ppo_reward.png", "ppo_reward_vs_kl.png"]


@pytest.mark.parametrize("make, fragment", [
    (lambda tmp_path: tmp_path / "missing", "no such run directory"),
    (lambda tmp_path: tmp_path, "not a run directory (no readable config.json with stages)"),
])
def test_cli_exits_2_with_one_line_without_a_run(tmp_path, make, fragment):
    run_dir = make(tmp_path)
    result = subprocess.run([sys.executable, "-m", "rlhf_jax.report", str(run_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"error: {run_dir}: {fragment}"]
    assert not (run_dir / "report.html").exists()
