"""The launcher, through the real command line (subprocesses) and through ``main`` in-process."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from rlhf_jax import launch, registry, stages
from rlhf_jax.config import apply_overrides, load_config, to_overrides

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_EXPERIMENTS = [experiment.name for experiment in registry.list_experiments()]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rlhf_jax.launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def assert_user_error(result, *fragments: str) -> str:
    """Exit status 2, one line on stderr (no traceback) containing every fragment."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Through the real command line.


def test_list_prints_every_experiment_with_its_description():
    result = cli("--list")
    assert result.returncode == 0 and result.stderr == ""
    listed = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert listed == {experiment.name: experiment.description for experiment in registry.list_experiments()}


@pytest.mark.parametrize("args, fragments", [
    (["experiment=tiny_sf", "--print-config"],
     ["experiment=tiny_sf: unknown experiment (did you mean 'tiny_sft'?); run with --list"]),
    (["experiment=tiny_pipeline", "stages.ppo.algorithm.kl_coeff=0.1", "--print-config"],
     ["unknown key 'stages.ppo.algorithm.kl_coeff' (did you mean 'stages.ppo.algorithm.kl_coef'?)"]),
    (["experiment=tiny_sft", "optimizer.learning_rate=fast", "--dry-run"],
     ["optimizer.learning_rate: got 'fast', expected a number"]),
    (["experiment=tiny_pipeline", "stages.ppo.algorithm.clip_eps=1.5", "--dry-run"],
     ["stages.ppo.algorithm.clip_eps: got 1.5, expected a number in (0, 1)"]),
])
def test_bad_input_exits_2_with_one_line(args, fragments):
    assert_user_error(cli(*args), *fragments)


def test_running_a_stage_without_a_trainer_exits_2(tmp_path, capsys, monkeypatch):
    from rlhf_jax import stages

    monkeypatch.setitem(stages.RUNNERS, "grpo", "rlhf_jax.stages.no_such_module:run")
    status, _, err = run_main(capsys, "experiment=grpo_7b", f"run_dir={tmp_path / 'run'}")
    assert status == 2 and "the grpo trainer is not available in this version of rlhf_jax" in err
    assert not list((tmp_path / "run").glob("*/DONE"))


def test_print_config_round_trip_through_the_cli():
    overrides = ["experiment=smollm2_hh_ppo", "seed=7", "stages.ppo.algorithm.kl_coef=0.2", "optimizer.grad_clip=None",
                 "stages.samples.stop=(\"\\n\\nHuman:\",\"a,b\")", "description=a b\tc"]
    first = cli(*overrides, "--print-config")
    assert first.returncode == 0 and first.stderr == "", first.stderr
    lines = first.stdout.splitlines()
    second = cli("--print-config", *lines)
    assert second.returncode == 0 and second.stdout == first.stdout
    expected = apply_overrides(registry.get_experiment("smollm2_hh_ppo"), overrides[1:])
    assert launch.build_config(lines) == expected
    assert expected.stage("samples").stop == ("\n\nHuman:", "a,b") and expected.description == "a b\tc"


def test_dry_run_writes_a_config_that_loads_back_equal(tmp_path):
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_pipeline", f"run_dir={run_dir}", "stages.ppo.algorithm.kl_coef=0.1"]
    result = cli(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "stage ppo (ppo): to run" in result.stdout and f"reward_model: {run_dir / 'rm'}" in result.stdout
    expected = launch.build_config(args)
    assert load_config(run_dir / "config.json") == expected
    assert launch.build_config((run_dir / "config.overrides").read_text().splitlines()) == expected
    assert not any((run_dir / name / "DONE").exists() for name in expected.stage_names())
    # the real runners' dry runs load the model and data and compile the train steps
    assert "sft train step: compiled" in result.stdout and "reward train step: compiled" in result.stdout


def test_launcher_imports_no_jax():
    code = "import sys, rlhf_jax.launch, rlhf_jax.registry; rlhf_jax.registry.list_experiments(); " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax', 'numpy', 'rich')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


# ---------------------------------------------------------------------------------------------
# Through main(), in-process.


def run_main(capsys, *args):
    status = launch.main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("name", ALL_EXPERIMENTS)
def test_print_config_reproduces_every_experiment(name, capsys):
    status, out, err = run_main(capsys, f"experiment={name}", "--print-config")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines == to_overrides(registry.get_experiment(name))
    assert launch.build_config(lines) == registry.get_experiment(name)
    status, again, _ = run_main(capsys, "--print-config", *lines)
    assert status == 0 and again == out


@pytest.mark.parametrize("args, fragments", [
    ([], ["no experiment given: pass experiment=NAME"]),
    (["experiment=tiny_sft", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["experiment=tiny_sft", "--list", "--dry-run"], ["not allowed with argument"]),
    (["experiment=tiny_sft", "experiment=tiny_pipeline"], ["experiment: given twice"]),
    (["experiment=tiny_pipeline", "stages.spt.epochs=2"], ["unknown stage 'stages.spt' (did you mean 'stages.sft'?)"]),
    (["experiment=tiny_pipeline", "stages.ppo.reward_model=stage:sft"], ["expected a stage of kind reward"]),
    (["experiment=tiny_sft", "data.path=/no/such/file.jsonl", "--dry-run"],
     ["data.path: got '/no/such/file.jsonl', expected an existing file"]),
    (["experiment=tiny_sft", "--config", "/no/such/config.json"], ["pass either experiment=NAME or --config"]),
    (["--config", "/no/such/config.json"], ["/no/such/config.json: no such config file"]),
    (["@/no/such/overrides"], ["No such file or directory"]),
])
def test_user_errors_in_process(args, fragments, capsys):
    status, out, err = run_main(capsys, *args)
    assert status == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for fragment in fragments:
        assert fragment in err


@pytest.fixture
def fake_runners(tmp_path, monkeypatch):
    """Runners for every stage kind that log their calls; a stage named in FAIL raises once."""
    module = tmp_path / "fake_stage_runner.py"
    module.write_text(textwrap.dedent("""
        import json, os, pathlib

        def run(experiment, stage, stage_dir, resolve):
            log = pathlib.Path(os.environ["FAKE_RUNNER_LOG"])
            if stage.name == os.environ.get("FAKE_RUNNER_FAIL") and not (stage_dir / "attempted").exists():
                (stage_dir / "attempted").write_text("")
                raise RuntimeError("interrupted")
            sources = {name: resolve(getattr(stage, name)) for name in ("model", "policy", "reward_model")
                       if getattr(stage, name, None) is not None}
            with log.open("a") as file:
                file.write(json.dumps({"stage": stage.name, "dir": str(stage_dir), "sources": sources}) + "\\n")

        def dry_run(experiment, stage, stage_dir, resolve):
            print(f"checked {stage.name}")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    for kind in ("sft", "reward", "ppo", "generate"):
        monkeypatch.setitem(stages.RUNNERS, kind, "fake_stage_runner:run")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_RUNNER_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_relaunch_skips_done_stages_and_reruns_unfinished_ones(tmp_path, fake_runners, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_pipeline", f"run_dir={run_dir}"]
    monkeypatch.setenv("FAKE_RUNNER_FAIL", "rm")
    with pytest.raises(RuntimeError, match="interrupted"):  # an internal failure is not a user error
        launch.main(args)
    assert [call["stage"] for call in fake_runners()] == ["sft"]
    assert (run_dir / "sft" / "DONE").exists() and not (run_dir / "rm" / "DONE").exists()
    capsys.readouterr()

    status, out, err = run_main(capsys, *args)
    assert status == 0 and err == ""
    assert f"stage sft (sft): already done ({run_dir / 'sft' / 'DONE'}), skipping" in out
    calls = fake_runners()
    assert [call["stage"] for call in calls] == ["sft", "rm", "ppo", "samples"]
    assert calls[1] == {"stage": "rm", "dir": str(run_dir / "rm"), "sources": {"model": str(run_dir / "sft")}}
    assert calls[2]["sources"] == {"policy": str(run_dir / "sft"), "reward_model": str(run_dir / "rm")}
    assert all((run_dir / name / "DONE").exists() for name in ("sft", "rm", "ppo", "samples"))

    status, out, _ = run_main(capsys, *args)  # everything done: nothing runs
    assert status == 0 and len(fake_runners()) == 4 and out.count("skipping") == 4


def test_dry_run_calls_the_runners_dry_run(tmp_path, fake_runners, capsys):
    status, out, _ = run_main(capsys, "experiment=tiny_pipeline", f"run_dir={tmp_path}", "--dry-run")
    assert status == 0
    assert [line for line in out.splitlines() if line.startswith("checked")] == [
        "checked sft", "checked rm", "checked ppo", "checked samples"]
    assert fake_runners() == []


def test_relaunch_with_a_different_config_is_refused_unless_allowed(tmp_path, capsys, fake_runners):
    run_dir = tmp_path / "run"
    base = ["experiment=tiny_pipeline", f"run_dir={run_dir}", "--dry-run"]
    assert run_main(capsys, *base, "stages.ppo.algorithm.kl_coef=0.3")[0] == 0
    # nothing has run yet (a run that failed before its first step): the corrected command takes the directory
    assert run_main(capsys, *base)[0] == 0
    assert load_config(run_dir / "config.json").stage("ppo").algorithm.kl_coef == 0.05
    (run_dir / "sft").mkdir(exist_ok=True)
    (run_dir / "sft" / "DONE").write_text("{}\n")  # a stage has finished: a different config is refused
    assert run_main(capsys, *base, "seed=0")[0] == 0  # the same config (seed 0 is the default)
    status, _, err = run_main(capsys, *base, "stages.ppo.algorithm.kl_coef=0.2")
    assert status == 2 and "holds a run of a different config (stages.ppo.algorithm.kl_coef: 0.05 -> 0.2)" in err
    status, _, _ = run_main(capsys, *base, "stages.ppo.algorithm.kl_coef=0.2", "--allow-config-change")
    assert status == 0
    assert load_config(run_dir / "config.json").stage("ppo").algorithm.kl_coef == 0.2
    assert load_config(run_dir / "config.previous.json").stage("ppo").algorithm.kl_coef == 0.05


def test_relaunch_from_the_saved_files(tmp_path, capsys, fake_runners):
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_sft", f"run_dir={run_dir}", "optimizer.learning_rate=3e-4", "--dry-run"]
    assert run_main(capsys, *args)[0] == 0
    expected = load_config(run_dir / "config.json")
    assert run_main(capsys, f"@{run_dir / 'config.overrides'}", "--dry-run")[0] == 0
    assert run_main(capsys, "--config", str(run_dir / "config.json"), "--dry-run")[0] == 0
    status, out, _ = run_main(capsys, "--config", str(run_dir / "config.json"), "seed=5", "--print-config")
    assert status == 0 and "seed=5" in out.splitlines()
    assert load_config(run_dir / "config.json") == expected


def test_extra_reward_sources_are_checked_and_shown_one_by_one(tmp_path):
    base = ["experiment=tiny_grpo", f"run_dir={tmp_path / 'run'}"]
    result = cli(*base, 'stages.grpo.extra_rewards=("fn:length:0.01","text:arith_exact")',
                 "stages.grpo.reward_weights=(1,0.5,2)", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "  extra_rewards: fn:length:0.01, text:arith_exact" in result.stdout
    assert_user_error(cli(*base, 'stages.grpo.extra_rewards=("stage:nope",)', "--dry-run"),
                      "stages.grpo.extra_rewards[0]: got 'stage:nope', expected")
    assert_user_error(cli(*base, 'stages.grpo.extra_rewards=("fn:length",)', "stages.grpo.reward_weights=(1,)",
                          "--dry-run"),
                      "stages.grpo.reward_weights: got (1.0,), expected one weight per reward source (2: "
                      "reward_model, then extra_rewards)")


def test_a_relaunch_loads_its_compiled_programs_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    env = {**os.environ, "RLHF_JAX_COMPILATION_CACHE": str(cache)}

    def launch(run_dir):
        result = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft", f"run_dir={run_dir}"],
                                cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr
        return {path.name for path in cache.iterdir()}

    first = launch(tmp_path / "a")
    assert any(not name.endswith("-atime") for name in first), first  # the train step at least was kept
    assert launch(tmp_path / "b") == first  # the same programs again: every one loaded, none compiled anew


def test_the_compilation_cache_can_be_switched_off_and_names_a_bad_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    for setting, code in ((str(blocker / "sub"), 2), ("off", 0)):
        result = subprocess.run([sys.executable, "-m", "rlhf_jax.launch", "experiment=tiny_sft",
                                 f"run_dir={tmp_path / setting.replace('/', '_')}", "stages.sft.max_steps=1"],
                                cwd=REPO, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "RLHF_JAX_COMPILATION_CACHE": setting})
        assert result.returncode == code, result.stderr
        if code:
            assert "RLHF_JAX_COMPILATION_CACHE" in result.stderr and "cannot create" in result.stderr
