"""The rlhf_jax side of the suite: runs one workload at a time the way the stage runners do, on request.

Started by `benchmarks/suite.py`, which talks to it in JSON lines (`protocol.serve`). The model is loaded by the
stages' `load_role` (the model spec's dtypes and layer settings), and every training step is the one the stage
runs: its module's `programs(experiment, stage, config)` (`rlhf_jax/stages/{sft,reward,dpo}.py`) binds it, a
`TrainState` holds the stage's optimizer (`build_optimizer`) and layout of the layers' weights
(`per_layer_state`), the state is donated and placed by `place_for_training` on the default mesh, and each host
batch is made a device batch as the stage's `run` makes it (for DPO: the stage's `reference_preparer`, the
jitted reference pass first, or with `--precompute-reference` its table of the reference's log-probs, computed
at setup). A timed step is `prepare` + the step + fetching its metrics (which waits for the step to finish). The
GRPO workload runs a whole RL stage through the launcher and reads the per-phase times the stage logs; the
relaunch workload runs an SFT stage through the launcher with the persistent compilation cache on, in a fresh
process each time.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np

from protocol import npz_batches, serve_workloads
from rlhf_jax.config import (GRPO_ALGORITHM, CheckpointConfig, DataConfig, DPOStage, ExperimentConfig, GRPOStage,
                             LoggingConfig, MeshConfig, ModelSpec, OptimizerConfig, OptimizerName, PreferenceLoss,
                             RewardStage, Schedule, SFTStage, validate)
from rlhf_jax.models import llama
from rlhf_jax.sampling import Sampler, SamplingSettings
from rlhf_jax.sharding import make_mesh, place_batch, place_for_training, use_mesh
from rlhf_jax.stages import dpo as dpo_stage
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.stages import sft as sft_stage
from rlhf_jax.stages.common import build_optimizer, length_order, load_role, loss_batch, per_layer_state
from rlhf_jax.stages.sft import SFT_KEYS
from rlhf_jax.trainers.sft import sft_eval_step
from rlhf_jax.training.calls import StepCalls, joins
from rlhf_jax.training.state import TrainState

SEED = 0


class CompileCounter:
    """Backend compilations (and their seconds) since the last `take()`: a timed step that compiled is
    reported as such, and left out of the steady-state median by the coordinator."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        if event.endswith("backend_compile_duration"):
            self.count += 1
            self.seconds += duration

    def take(self) -> dict:
        taken = {"compiles": self.count, "compile_seconds": self.seconds}
        self.count, self.seconds = 0, 0.0
        return taken


class CacheCounter:
    """Programs loaded from the persistent compilation cache since the last `take()`."""

    def __init__(self):
        self.hits = 0
        jax.monitoring.register_event_listener(self._record)

    def _record(self, event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1

    def take(self) -> dict:
        taken = {"cache_hits": self.hits}
        self.hits = 0
        return taken


def experiment(spec: dict, stage, param_dtype: str = "float32") -> ExperimentConfig:
    """The experiment config a stage run of this workload would have (model in the run's precision, data,
    optimizer). Training keeps float32 parameters (bfloat16: bf16 compute on float32 master weights)."""
    model = ModelSpec(source=spec["model"], dtype=spec["precision"], param_dtype=param_dtype)
    return ExperimentConfig(
        name="benchmark", run_dir=spec.get("run_dir", "runs/benchmark"), model=model,
        data=DataConfig(path=spec["data_path"], max_prompt_length=spec["max_prompt_length"],
                        max_length=spec["max_length"], batch_size=spec["batch_size"],
                        max_examples=spec.get("max_examples")),
        optimizer=OptimizerConfig(**{**spec["optimizer"], "name": OptimizerName(spec["optimizer"]["name"]),
                                     "schedule": Schedule(spec["optimizer"]["schedule"])}),
        stages=(stage,),
    )


class Workload:
    """A stage's train step with its state and batches: `step(i)` runs batch i and returns its numbers."""

    def __init__(self, spec: dict, compiles: CompileCounter):
        self.spec = spec
        self.compiles = compiles
        self.inputs = np.load(spec["inputs"])
        # the stage's loader: the model spec's dtypes, remat and layer-scan settings
        role = load_role(experiment(spec, SFTStage(name="load")), None, lambda source: source, with_tokenizer=False)
        self.config, self.params = role.config, role.params
        self.mesh = make_mesh(MeshConfig())
        self.micro_batches = spec["optimizer"]["micro_batches"]
        self.total_steps = spec["steps"]
        name = spec["workload"]
        self.facts = {}  # what setup measured, for the setup reply
        self.state, self.step_fn, self.prepare, self.host_batches = getattr(self, f"_build_{name}")()
        del self.params  # in the train state now (or donated to it)

    # -- builders: (state, jitted step, prepare, host batches), as the stage's run() wires them --------------

    def _train(self, stage, module, params):
        """(state, jitted step, the stage's `StagePrograms`): `module.programs` builds the step the stage runs."""
        built = module.programs(experiment(self.spec, stage), stage, self.config)
        tx = build_optimizer(experiment(self.spec, stage), stage, self.total_steps, built.trainable)
        state = TrainState.create(params, tx, jax.random.key(SEED),
                                  per_layer=per_layer_state(stage, self.config, built.trainable))
        (state,), step_fn = place_for_training(built.step, (state,), self.mesh, (),
                                               steps_per_call=self.spec["optimizer"].get("steps_per_call", 1),
                                               micro_batches=self.micro_batches)
        return state, step_fn, built

    def _build_sft(self, prefix: str = ""):
        stage = SFTStage(name="sft")
        state, step_fn, _ = self._train(stage, sft_stage, self.params)
        mesh, micro_batches, order = self.mesh, self.micro_batches, length_order(experiment(self.spec, stage), stage)
        prepare = lambda batch: place_batch(loss_batch(order(batch), SFT_KEYS, micro_batches), mesh)  # noqa: E731
        return state, step_fn, prepare, npz_batches(self.inputs, prefix)

    def _build_sft_packed(self):
        return self._build_sft(prefix="packed/")

    def _build_sft_padding_free(self):
        return self._build_sft(prefix="free/")

    def _build_rm(self, shared_prefix: bool = False):
        stage = RewardStage(name="rm", shared_prefix=shared_prefix)
        key = jax.random.fold_in(jax.random.key(SEED), 1)
        model = llama.init_scalar_model(self.config, self.params, key)
        # the suite gave the TRL model this head: check it is the one the stage draws (the suite drew it on the
        # CPU; a GPU draws the same normal variates to within float32 rounding)
        np.testing.assert_allclose(np.asarray(model["head"]["kernel"]), self.inputs["head_kernel"], rtol=1e-6)
        state, step_fn, _ = self._train(stage, reward_stage, model)
        mesh, arrays = self.mesh, reward_stage.pair_batch(stage)
        order = length_order(experiment(self.spec, stage), stage)
        prepare = lambda batch: place_batch(arrays(order(batch)), mesh)  # noqa: E731
        return state, step_fn, prepare, npz_batches(self.inputs)

    def _build_rm_shared(self):
        return self._build_rm(shared_prefix=True)

    def _build_dpo(self, shared_prefix: bool = False):
        stage = DPOStage(name="dpo", loss=PreferenceLoss(beta=self.spec["beta"]), shared_prefix=shared_prefix)
        # a copy: the policy's buffers are donated to the train step
        reference = jax.tree.map(jnp.copy, self.params)
        state, step_fn, built = self._train(stage, dpo_stage, self.params)
        batches = npz_batches(self.inputs)
        precompute = None
        if self.spec["precompute_reference"]:  # the stage's `precompute_reference=true` over these batches
            size = len(batches[0]["chosen_tokens"])
            batches = [{**batch, "index": np.arange(i * size, (i + 1) * size, dtype=np.int32)}
                       for i, batch in enumerate(batches)]
            precompute = (batches, size)
        # the stage's own batch preparation: the jitted reference pass on each batch, merged into it, or the
        # reference's log-probs of every pair computed here, once, and looked up by each batch
        start = time.perf_counter()
        _, prepare = dpo_stage.reference_preparer(built, self.config, reference, self.mesh,
                                                  dpo_stage.pair_batch(stage, self.micro_batches), precompute,
                                                  shared_prefix)
        if precompute:
            self.facts["reference_pass_s"] = time.perf_counter() - start
        order = length_order(experiment(self.spec, stage), stage)
        return state, step_fn, lambda batch: prepare(order(batch)), batches

    def _build_dpo_shared(self):
        return self._build_dpo(shared_prefix=True)

    # -- requests -------------------------------------------------------------------------------------------

    def step(self, index: int) -> dict:
        """One optimizer step on batch `index` (sft_packed: one pass over all its packed batches, with
        `--steps-per-call` in calls as the stage makes them)."""
        self.compiles.take()
        todo = self.host_batches if self.spec["workload"] == "sft_packed" else [
            self.host_batches[index % len(self.host_batches)]]
        start = time.perf_counter()
        losses = [metrics for _, metrics in self._run(todo)]
        seconds = time.perf_counter() - start
        first = {name: float(value) for name, value in losses[0].items()}
        loss_key = next(name for name in first if name.endswith("/loss"))
        return {"seconds": seconds, "loss": first[loss_key], "metrics": first,
                "losses": [float(m[loss_key]) for m in losses], **self.compiles.take()}

    def steps(self, indices: list[int]) -> dict:
        """`--steps-per-call`: the steps on batches `indices`, in calls as the stage makes them (`_run`). Each
        step's record gets an equal share of the whole time (preparing the batches included, as in `step`); if
        any call compiled, every step is marked as compiled."""
        self.compiles.take()
        start = time.perf_counter()
        metrics = self._run([self.host_batches[index % len(self.host_batches)] for index in indices])
        seconds = (time.perf_counter() - start) / len(indices)
        compiled = self.compiles.take()
        records = []
        for call_steps, step_metrics in metrics:
            first = {name: float(value) for name, value in step_metrics.items()}
            loss_key = next(name for name in first if name.endswith("/loss"))
            records.append({"seconds": seconds, "loss": first[loss_key], "metrics": first,
                            "losses": [first[loss_key]], "call_steps": call_steps, **compiled})
        return {"records": records}

    def _run(self, host_batches: list) -> list[tuple[int, dict]]:
        """The step over `host_batches` in order, each prepared as the stage prepares it: one call a step, or with
        `--steps-per-call` (`optimizer.steps_per_call`) consecutive batches of one shape in one call of up to
        that many steps, a batch of another shape starting the next call, as `stages.common.fit` makes them.
        Returns (the steps of its call, its metrics on the host) for each batch."""
        prepared = [self.prepare(batch) for batch in host_batches]
        if not isinstance(self.step_fn, StepCalls):
            done = []
            for batch in prepared:
                self.state, metrics = self.step_fn(self.state, batch)
                done.append((1, jax.device_get(metrics)))
            return done
        calls = []
        for batch in prepared:
            if calls and joins(calls[-1], batch, self.step_fn.steps_per_call):
                calls[-1].append(batch)
            else:
                calls.append([batch])
        done = []
        for batches in calls:
            self.state, call_metrics = self.step_fn(self.state, batches)
            done.extend((len(batches), metrics) for metrics in call_metrics)
        return done

    def check(self) -> dict:
        """sft_packed: Σ NLL and token count over every packed batch with the current (initial) weights."""
        eval_fn = jax.jit(functools.partial(sft_eval_step, self.config))
        total, count = 0.0, 0.0
        for host_batch in self.host_batches:
            # the evaluation's layout: one loss index over the whole batch (the step's is per micro-batch)
            with use_mesh(self.mesh):
                loss_sum, tokens = eval_fn(self.state.params,
                                           place_batch(loss_batch(host_batch, SFT_KEYS), self.mesh))
            total, count = total + float(loss_sum), count + float(tokens)
        return {"loss_sum": total, "count": count}


class SamplerWorkload:
    """`rlhf_jax.sampling.Sampler`, greedy, EOS ignored: every row gets `max_new_tokens` tokens. The weights
    are held in the run's precision (inference keeps no master copy)."""

    def __init__(self, spec: dict, compiles: CompileCounter):
        self.compiles = compiles
        inputs = np.load(spec["inputs"])
        role = load_role(experiment(spec, SFTStage(name="load"), param_dtype=spec["precision"]), None,
                         lambda source: source, with_tokenizer=False)
        self.config, self.params = role.config, role.params
        self.tokens, self.mask = inputs["prompt_tokens"], inputs["prompt_mask"]
        self.sampler = Sampler(self.config)
        self.settings = SamplingSettings(greedy=True, max_new_tokens=spec["new_tokens"], eos_token_ids=())
        self.key = jax.random.key(SEED)

    def step(self, index: int) -> dict:
        self.compiles.take()
        start = time.perf_counter()
        out = jax.block_until_ready(self.sampler(self.params, self.tokens, self.mask, self.key, self.settings))
        seconds = time.perf_counter() - start
        assert int(np.asarray(out.response_mask).sum()) == self.tokens.shape[0] * self.settings.max_new_tokens
        reply = {"seconds": seconds, **self.compiles.take()}
        if index == 0:
            reply["tokens"] = np.asarray(out.response_tokens).tolist()
        return reply


def through_launcher(spec: dict, stage) -> tuple[list[dict], float]:
    """Run `stage` alone through the launcher (`launch.run`), as `python -m rlhf_jax.launch` would, in a fresh
    run directory: (the records it logged to its metrics.jsonl, the run's wall seconds)."""
    from rlhf_jax import launch

    with tempfile.TemporaryDirectory(prefix=f"{stage.name}-", dir=spec.get("work_dir")) as run_dir:
        config = dataclasses.replace(experiment({**spec, "run_dir": run_dir}, stage),
                                     checkpoint=CheckpointConfig(every_steps=10**6, keep_last=1),
                                     logging=LoggingConfig(every_steps=1, sample_every=None))
        validate(config, check_paths=True)
        start = time.perf_counter()
        launch.run(config, launch.prepare_run_dir(config))
        wall = time.perf_counter() - start
        lines = (Path(run_dir) / stage.name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], wall


def grpo(spec: dict) -> dict:
    """One GRPO stage of `warmup + steps` iterations through the launcher; the per-phase seconds it logs."""
    stage = GRPOStage(
        name="grpo", reward_model=spec["reward"], max_steps=spec["iterations"],
        rollout_batch_size=spec["prompts"], max_new_tokens=spec["new_tokens"],
        algorithm=dataclasses.replace(GRPO_ALGORITHM, group_size=spec["group_size"],
                                      mini_batch_size=spec["mini_batch_size"], update_epochs=spec["update_epochs"]),
        shared_prefix=spec.get("shared_prefix", False),
    )
    records, _ = through_launcher(spec, stage)
    keys = ("time/generate", "time/score", "time/train", "time/step")
    return {"iterations": [{key: record[key] for key in keys if key in record} for record in records
                           if "time/generate" in record]}


def launch_sft(spec: dict, compiles: "CompileCounter", cache: "CacheCounter") -> dict:
    """An SFT stage of `spec["steps"]` epochs of one batch (`max_examples` = the batch size) through the
    launcher with its persistent compilation cache on (`launch.enable_compilation_cache`, the directory from
    ``$RLHF_JAX_COMPILATION_CACHE``, which the suite sets before it starts this process): each step's logged
    `time/step` (the first with its compilation or its programs' loading), the run's wall seconds, and the
    programs compiled and loaded from the cache."""
    from rlhf_jax import launch

    directory = launch.enable_compilation_cache()
    assert directory is not None, "the relaunch workload needs the compilation cache on"
    compiles.take(), cache.take()
    records, wall = through_launcher(spec, SFTStage(name="sft", epochs=spec["steps"], max_steps=spec["steps"]))
    return {"steps_s": [record["time/step"] for record in records if "time/step" in record], "wall_s": wall,
            **compiles.take(), **cache.take()}


def square_matmul(size: int, dtype: str, on: str):
    """One synchronised size × size product in `dtype`, accumulated in float32, on JAX's default device (the
    workloads' device, which the suite calls `on`)."""
    a = jax.random.normal(jax.random.key(1), (size, size), dtype)
    b = jax.random.normal(jax.random.key(2), (size, size), dtype)
    matmul = jax.jit(functools.partial(jnp.dot, preferred_element_type=jnp.float32))
    return lambda: matmul(a, b).block_until_ready()


def main() -> None:
    compiles, cache = CompileCounter(), CacheCounter()

    def build(spec: dict):
        kind = SamplerWorkload if spec["workload"].startswith("sampler") else Workload
        workload = kind(spec, compiles)
        return workload, {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                          "accelerator": jax.devices()[0].device_kind, **getattr(workload, "facts", {})}

    def free() -> None:
        gc.collect()
        jax.clear_caches()

    serve_workloads(build, free, square_matmul, grpo=lambda request: grpo(request["spec"]),
                    launch_sft=lambda request: launch_sft(request["spec"], compiles, cache))


if __name__ == "__main__":
    main()
