"""The choices tests/real_run.sh makes on the GPU machine: the headroom animal and the training arrangement."""
from __future__ import annotations

import json

import pytest

from tests.real_run_choice import choose_animals, choose_arrangement


def write_base(path, rates: dict[str, float]):
    path.write_text(json.dumps({"animals": {a: {"rate": r} for a, r in rates.items()}}))
    return path


def test_auto_is_the_first_animal_with_headroom(tmp_path):
    base = write_base(tmp_path / "base.json", {"owl": 0.0, "eagle": 0.0, "dolphin": 0.9, "wolf": 0.05, "lion": 0.0,
                                               "cat": 0.3, "dog": 0.7})
    # eagle and lion never named, dolphin dominant: wolf is the first study animal with room to move,
    # then the other candidates (cat; dog is dominant); owl is kept as given
    assert choose_animals("owl,auto", base) == ["owl", "wolf"]
    assert choose_animals("owl,auto,auto", base) == ["owl", "wolf", "cat"]
    with pytest.raises(SystemExit, match="headroom"):
        choose_animals("owl,auto,auto,auto", base)


def write_bench(path, **rates: float):
    path.write_text(json.dumps([{"impl": impl, "tokens_per_s": r} for impl, r in rates.items()]))


@pytest.mark.parametrize("r9, pair, expected", [
    (130_000, 60_000, ["--cohort", "3"]),                    # nothing beats three cohorts in turn
    (130_000, 80_000, ["--cohort", "3", "--per-gpu", "2"]),  # two processes fill the GPU
    (200_000, 80_000, ["--cohort", "9"]),                    # one pass over all nine, well ahead
    (150_000, 80_000, ["--cohort", "3", "--per-gpu", "2"]),  # nine ahead, but not by the margin
])
def test_arrangement_follows_the_measured_rates(tmp_path, r9, pair, expected):
    write_bench(tmp_path / "bench-alone.json", **{"ours x3": 120_000, "ours x9": r9})
    for k in (0, 1):
        write_bench(tmp_path / f"bench-pair{k}.json", **{"ours x3": pair})
    options, why = choose_arrangement(tmp_path)
    assert options == expected
    assert "120,000" in why


def test_no_benchmark_leaves_the_default(tmp_path):
    assert choose_arrangement(tmp_path)[0] == []
