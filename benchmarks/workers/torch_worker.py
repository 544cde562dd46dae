"""The TRL / transformers side of the suite: one workload at a time, driven step by step, on request.

Started by `benchmarks/suite.py` (JSON lines, `protocol.serve`). Each training workload builds the TRL
trainer once (`SFTTrainer`, `RewardTrainer`, `DPOTrainer` with a reference model) from the Hugging Face
directory the suite exported, in the run's precision (float32, or `bf16=True`: float32 weights under bf16
autocast) on the CPU (two torch threads) or the GPU. Its batches are the suite's examples
through the trainer's own data collator (checked to equal the arrays rlhf_jax gets). Optimizer and
scheduler are set up as `Trainer._prepare_for_training` does on one CPU process (`create_optimizer`,
`accelerator.prepare`, `create_scheduler`), and one timed step is what `Trainer`'s inner loop does for a
batch without gradient accumulation:

    batch_samples, num_items = trainer.get_batch_samples(iter([batch]), 1, device)
    loss = trainer.training_step(model, batch_samples[0], num_items)     # forward + backward
    accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)        # `Trainer._clip_grad_norm`
    optimizer.step(); lr_scheduler.step(); model.zero_grad()

plus `loss.item()`. The sampler workload times `model.generate` (greedy, EOS ignored) under
`torch.inference_mode()`, with the weights in the run's precision. On a GPU every timed request ends with the
device synchronised.
"""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from protocol import npz_batches, serve_workloads  # noqa: E402

THREADS = 2
SEED = 0
TOP_LOGITS = 5  # the sampler's first-step logits reported for the suite's near-tie check


def rows(ids: np.ndarray, mask: np.ndarray) -> list[list[int]]:
    """The unpadded token lists of right- or left-padded rows."""
    return [row[keep].tolist() for row, keep in zip(ids, mask.astype(bool))]


def assert_same(name: str, collated: torch.Tensor, ours: np.ndarray) -> None:
    theirs = collated.numpy()
    if theirs.shape != ours.shape or not np.array_equal(theirs, ours.astype(theirs.dtype)):
        raise AssertionError(f"TRL's collator built {name} {theirs.shape} unlike rlhf_jax's {ours.shape}")


def device(name: str) -> torch.device:
    """The torch device of the suite's "cpu" or "gpu"."""
    return torch.device("cuda" if name == "gpu" else "cpu")


def synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def common_args(spec: dict, output_dir: str) -> dict:
    """TrainingArguments shared by every trainer: the run's precision and device, the suite's AdamW, nothing
    logged or saved."""
    optimizer = spec["optimizer"]
    return dict(
        output_dir=output_dir, per_device_train_batch_size=spec["batch_size"], learning_rate=optimizer["learning_rate"],
        weight_decay=optimizer["weight_decay"], adam_beta1=optimizer["b1"], adam_beta2=optimizer["b2"],
        adam_epsilon=optimizer["eps"], max_grad_norm=optimizer["grad_clip"] or 0.0, lr_scheduler_type="constant",
        bf16=spec["precision"] == "bfloat16", fp16=False, gradient_checkpointing=False,
        use_cpu=spec["device"] == "cpu", report_to="none", save_strategy="no",
        logging_strategy="no", seed=SEED, max_length=spec["max_length"], disable_tqdm=True,
    )


class Workload:
    """A TRL trainer and its collated batches: `step(i)` is one `Trainer` step on batch i."""

    def __init__(self, spec: dict):
        from transformers import AutoTokenizer

        self.spec = spec
        self.inputs = np.load(spec["inputs"])
        self.tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        self.pad_token = self.tokenizer.convert_ids_to_tokens(int(self.inputs["pad_id"]))
        self.output_dir = tempfile.mkdtemp(prefix="trl-", dir=spec.get("work_dir"))
        self.facts = {}  # what setup measured, for the setup reply
        self.trainer, self.batches = getattr(self, f"_build_{spec['workload']}")()
        trainer = self.trainer
        trainer.create_optimizer()
        self.model, trainer.optimizer = trainer.accelerator.prepare(trainer.model, trainer.optimizer)
        trainer.model_wrapped = self.model
        trainer.create_scheduler(num_training_steps=spec["steps"])

    def _causal_lm(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.spec["model"], dtype=torch.float32)

    def _sft_trainer(self, examples: list[dict], pad_to: int | None):
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**common_args(self.spec, self.output_dir), completion_only_loss=True,
                         pad_token=self.pad_token, pad_to_multiple_of=pad_to, dataset_num_proc=None)
        return SFTTrainer(model=self._causal_lm(), args=args, train_dataset=Dataset.from_list(examples),
                          processing_class=self.tokenizer)

    @staticmethod
    def _sft_examples(arrays: dict) -> list[dict]:
        """Prompt + response token lists with TRL's `completion_mask` (our `loss_mask`: the response tokens)."""
        mask = arrays["attention_mask"]
        return [{"input_ids": ids, "completion_mask": [int(x) for x in completion]}
                for ids, completion in zip(rows(arrays["tokens"], mask), rows(arrays["loss_mask"], mask))]

    def _build_sft(self):
        ours = npz_batches(self.inputs)
        examples = [example for arrays in ours for example in self._sft_examples(arrays)]
        trainer = self._sft_trainer(examples, pad_to=self.spec["max_length"])
        prepared, size = trainer.train_dataset, self.spec["batch_size"]
        assert len(prepared) == len(examples), "TRL dropped examples while preparing the dataset"
        collated = []
        for index, arrays in enumerate(ours):
            batch = trainer.data_collator([prepared[i] for i in range(index * size, (index + 1) * size)])
            assert_same("input_ids", batch["input_ids"], arrays["tokens"])
            assert_same("attention_mask", batch["attention_mask"], arrays["attention_mask"])
            # labels[t] = token t where it carries a loss (TRL shifts inside the model call)
            assert_same("labels != -100", batch["labels"] != -100, arrays["loss_mask"])
            collated.append(batch)
        return trainer, collated

    def _build_sft_padding_free(self):  # TRL: the padded rows of `sft` (ours packs the same examples)
        return self._build_sft()

    def _build_sft_packed(self):
        """TRL's default batching: each batch of `batch_size` examples padded to its longest, no packing."""
        examples = self._sft_examples({key: self.inputs[f"examples/{key}"]
                                       for key in ("tokens", "attention_mask", "loss_mask")})
        trainer = self._sft_trainer(examples, pad_to=None)
        prepared, size = trainer.train_dataset, self.spec["batch_size"]
        assert len(prepared) == len(examples), "TRL dropped examples while preparing the dataset"
        collated = [trainer.data_collator([prepared[i] for i in range(start, min(start + size, len(prepared)))])
                    for start in range(0, len(prepared), size)]
        return trainer, collated

    def _build_rm(self):
        from datasets import Dataset
        from transformers import AutoModelForSequenceClassification
        from trl import RewardConfig, RewardTrainer

        model = AutoModelForSequenceClassification.from_pretrained(self.spec["model"], num_labels=1,
                                                                   dtype=torch.float32)
        with torch.no_grad():  # the head rlhf_jax's reward stage starts from (its zero bias has no HF slot)
            model.score.weight.copy_(torch.from_numpy(self.inputs["head_kernel"].T))
        ours = npz_batches(self.inputs)
        examples = [{"chosen_ids": chosen, "rejected_ids": rejected} for arrays in ours for chosen, rejected in zip(
            rows(arrays["chosen_tokens"], arrays["chosen_attention_mask"]),
            rows(arrays["rejected_tokens"], arrays["rejected_attention_mask"]))]
        args = RewardConfig(**common_args(self.spec, self.output_dir), pad_token=self.pad_token,
                            pad_to_multiple_of=self.spec["max_length"], center_rewards_coefficient=None,
                            dataset_num_proc=None)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples),
                                processing_class=self.tokenizer)
        prepared, size = trainer.train_dataset, self.spec["batch_size"]
        assert len(prepared) == len(examples), "TRL dropped pairs while preparing the dataset"
        collated = []
        for index, arrays in enumerate(ours):
            batch = trainer.data_collator([prepared[i] for i in range(index * size, (index + 1) * size)])
            for key in ("tokens", "attention_mask"):  # TRL stacks [chosen; rejected]
                stacked = np.concatenate([arrays[f"chosen_{key}"], arrays[f"rejected_{key}"]])
                assert_same(key, batch["input_ids" if key == "tokens" else key], stacked)
            collated.append(batch)
        return trainer, collated

    def _build_rm_shared(self):  # TRL's reward model computes both sequences whole, as in `rm`
        return self._build_rm()

    def _build_dpo_shared(self):  # TRL's DPO computes both sequences whole, as in `dpo`
        return self._build_dpo()

    def _build_dpo(self):
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ours = npz_batches(self.inputs)
        args = DPOConfig(**common_args(self.spec, self.output_dir), beta=self.spec["beta"], loss_type=["sigmoid"],
                         precompute_ref_log_probs=False, pad_token=self.pad_token,
                         pad_to_multiple_of=self.spec["max_length"], dataset_num_proc=None)
        # DPOTrainer tokenizes whatever train_dataset it is given; the steps use the suite's ids through its
        # collator instead, so the dataset only has to let the trainer be built.
        placeholder = Dataset.from_list([{"prompt": "Hello", "chosen": " yes", "rejected": " no"}])
        trainer = DPOTrainer(model=self._causal_lm(), ref_model=self._causal_lm(), args=args,
                             train_dataset=placeholder, processing_class=self.tokenizer)
        collated = []
        for arrays in ours:
            examples = []
            for row in range(arrays["chosen_tokens"].shape[0]):
                sides = {}
                for side in ("chosen", "rejected"):
                    keep = arrays[f"{side}_attention_mask"][row].astype(bool)
                    ids = arrays[f"{side}_tokens"][row][keep]
                    response = arrays[f"{side}_loss_mask"][row][keep].astype(bool)
                    sides[side] = (ids[~response].tolist(), ids[response].tolist())
                assert sides["chosen"][0] == sides["rejected"][0], "a pair whose sides have different prompts"
                examples.append({"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1],
                                 "rejected_ids": sides["rejected"][1]})
            batch = trainer.data_collator(examples)
            for key, theirs in (("tokens", "input_ids"), ("attention_mask", "attention_mask"),
                                ("loss_mask", "completion_mask")):
                stacked = np.concatenate([arrays[f"chosen_{key}"], arrays[f"rejected_{key}"]])
                assert_same(key, batch[theirs], stacked)
            collated.append(batch)
        if self.spec["precompute_reference"]:
            # what `precompute_ref_log_probs=True` does before training, on these batches: the reference's
            # log-probs of each pair by the trainer's own `compute_ref_log_probs`, read by `compute_loss` from
            # the batch; the reference model is then dropped, as TRL drops it
            start = time.perf_counter()
            for batch in collated:
                chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, trainer._prepare_inputs(batch))
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = chosen.cpu(), rejected.cpu()
            synchronize()
            self.facts["reference_pass_s"] = time.perf_counter() - start
            trainer.precompute_ref_logps, trainer.ref_model = True, None
        return trainer, collated

    def _one_step(self, batch: dict) -> float:
        trainer, model = self.trainer, self.model
        paired = self.spec["workload"] in ("rm", "rm_shared", "dpo", "dpo_shared")
        parts = split_rows(batch, self.spec["optimizer"]["micro_batches"], paired=paired)
        batch_samples, num_items = trainer.get_batch_samples(iter(parts), len(parts), trainer.args.device)
        trainer.current_gradient_accumulation_steps = len(parts)  # as Trainer's loop sets it when accumulating
        loss = sum(trainer.training_step(model, sample, num_items) for sample in batch_samples)
        if trainer.args.max_grad_norm > 0:
            trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        model.zero_grad()
        return loss.item()

    def step(self, index: int) -> dict:
        todo = self.batches if self.spec["workload"] == "sft_packed" else [self.batches[index % len(self.batches)]]
        start = time.perf_counter()
        losses = [self._one_step(batch) for batch in todo]
        seconds = time.perf_counter() - start
        # TRL logs a metric per micro-batch: the step's is the mean of its last M (equal-sized micro-batches)
        parts = self.spec["optimizer"]["micro_batches"]
        metrics = {name: sum(values[-parts:]) / len(values[-parts:])
                   for name, values in self.trainer._metrics["train"].items() if values}
        return {"seconds": seconds, "loss": losses[0], "losses": losses, "metrics": metrics}

    def check(self) -> dict:
        """sft_packed: Σ NLL and predicted-token count over every batch with the current (initial) weights."""
        total, count = 0.0, 0.0
        with torch.no_grad(), self.trainer.compute_loss_context_manager():  # bf16: the steps' autocast
            for batch in self.batches:
                tokens = float((batch["labels"][:, 1:] != -100).sum())
                loss = self.trainer.compute_loss(self.model, self.trainer._prepare_inputs(dict(batch)),
                                                 num_items_in_batch=None)
                total, count = total + float(loss) * tokens, count + tokens
        return {"loss_sum": total, "count": count}


def split_rows(batch: dict, parts: int, paired: bool) -> list[dict]:
    """`batch` as `parts` micro-batches of consecutive rows: every tensor whose first axis is the batch's rows
    is cut, the rest kept. `paired`: the rows are [chosen; rejected] (TRL's reward and DPO collators), so
    micro-batch j takes chunk j of each half, keeping each pair together, and chunk j of each per-pair tensor
    (precomputed reference log-probs). (Ours splits strided, rows j, j + M, …: other rows per micro-batch, the
    same accumulated gradient.)"""
    rows = batch["input_ids"].shape[0]
    if parts == 1:
        return [dict(batch)]
    halves = 2 if paired else 1
    if rows % (halves * parts):
        raise ValueError(f"{rows} rows do not split into {parts} micro-batches" + (" of pairs" if paired else ""))
    size = rows // halves // parts
    out = []
    for part in range(parts):
        index = torch.cat([torch.arange(half * rows // halves + part * size, half * rows // halves + (part + 1) * size)
                           for half in range(halves)])
        pairs = slice(part * size, (part + 1) * size)
        firsts = {key: value.shape[0] for key, value in batch.items() if torch.is_tensor(value) and value.ndim}
        out.append({key: value[index] if firsts.get(key) == rows
                    else value[pairs] if paired and firsts.get(key) == rows // 2 else value
                    for key, value in batch.items()})
    return out


class SamplerWorkload:
    """`model.generate`, greedy, EOS ignored (no EOS id): every row gets `new_tokens` tokens."""

    def __init__(self, spec: dict):
        from transformers import AutoModelForCausalLM

        inputs = np.load(spec["inputs"])
        dtype = getattr(torch, spec["precision"])
        self.model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device(spec["device"])).eval()
        self.model.generation_config.eos_token_id = None
        self.new_tokens = spec["new_tokens"]
        self.inputs = {key: torch.as_tensor(inputs[name].astype(np.int64)).to(device(spec["device"]))
                       for key, name in (("input_ids", "prompt_tokens"), ("attention_mask", "prompt_mask"))}
        self.pad_id = int(inputs["pad_id"])

    def step(self, index: int) -> dict:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, min_new_tokens=None,
                                      do_sample=False, pad_token_id=self.pad_id)
        synchronize()
        seconds = time.perf_counter() - start
        response = out[:, self.inputs["input_ids"].shape[1]:]
        assert response.shape[1] == self.new_tokens, f"generate stopped after {response.shape[1]} tokens"
        reply = {"seconds": seconds}
        if index == 0:
            reply["tokens"] = response.tolist()
            with torch.inference_mode():  # untimed: the logits the first new token was chosen from
                top = self.model(**self.inputs).logits[:, -1].float().topk(TOP_LOGITS)
            reply["first_top"] = {"ids": top.indices.tolist(), "logits": top.values.tolist()}
        return reply


def square_matmul(size: int, dtype: str, on: str):
    """One synchronised size × size product in `dtype` on the device `on` ("cpu" or "gpu")."""
    generator = torch.Generator().manual_seed(1)
    a, b = (torch.randn(size, size, generator=generator).to(device(on), getattr(torch, dtype)) for _ in range(2))

    def matmul():
        torch.mm(a, b)
        synchronize()

    return matmul


def main() -> None:
    import transformers
    import trl

    torch.set_num_threads(THREADS)
    torch.manual_seed(SEED)

    def build(spec: dict):
        workload = (SamplerWorkload if spec["workload"].startswith("sampler") else Workload)(spec)
        trainer = getattr(workload, "trainer", None)
        accelerator = torch.cuda.get_device_name() if spec["device"] == "gpu" else None
        return workload, {"torch": torch.__version__, "transformers": transformers.__version__,
                          "accelerator": accelerator,
                          "trl": trl.__version__, "threads": torch.get_num_threads(),
                          "optim": str(trainer.args.optim.value) if trainer else None,
                          **getattr(workload, "facts", {})}

    def free() -> None:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed model and optimizer memory back to the system
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    serve_workloads(build, free, square_matmul)


if __name__ == "__main__":
    main()
