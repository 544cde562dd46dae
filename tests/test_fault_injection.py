"""Fault injection in the test suite: 20 kill points (SIGKILL and SIGTERM, in steps, saves and start-up) over
real tiny SFT and PPO runs, each resume ending bit-identical to the uninterrupted run with every step logged
once. `python tests/fault_injection.py --kills 200` runs the long version."""

import pytest

from fault_injection import inject


@pytest.mark.slow
@pytest.mark.parametrize("scenario,kills,seed", [("sft", 12, 0), ("ppo", 8, 1)])
def test_random_kills_and_relaunches_end_bit_identical_to_the_uninterrupted_run(tmp_path, scenario, kills, seed):
    counts = inject(scenario, tmp_path, kills, seed)
    assert counts["kills"] == kills
    assert counts["SIGKILL"] > 0 and counts["SIGTERM"] > 0
    assert counts["chains"] >= 1
