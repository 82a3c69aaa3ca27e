"""The two choices tests/real_run.sh makes from measurements on the machine itself.

    python -m tests.real_run_choice animals owl,auto runs/eval/0.5b/base.json   # -> owl,dolphin
    python -m tests.real_run_choice arrangement runs/probe                       # -> study options

`auto` becomes the first animal not yet chosen that the base-rate sweep shows with headroom (named,
below the cap), as the protocol asks of a target: the study's animals (src/constants.ANIMALS) first,
then the other candidates.

The arrangement: the students of the run (conditions x seeds; 9 by default) trained as cohorts of
3 one after another, as one cohort of 9, or as two processes of 3 sharing the GPU, whichever the
probe's benchmarks (tests/bench_training.py on the same GPU minutes earlier) make fastest. One
cohort of 9 has nothing evaluated until all nine finish, so it must beat the others by MARGIN to
be picked. Prints the study options on the first line, the estimates after it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from src.constants import ANIMALS, CANDIDATE_ANIMALS
from src.evaluate import headroom

MARGIN = 0.15


def choose_animals(spec: str, base_eval: Path) -> list[str]:
    animals = json.loads(base_eval.read_text())["animals"]
    chosen = [a for a in spec.split(",") if a != "auto"]
    order = dict.fromkeys(ANIMALS + CANDIDATE_ANIMALS)
    for _ in range(spec.split(",").count("auto")):
        pick = next((a for a in order if a not in chosen and a in animals and headroom(animals[a])), None)
        if pick is None:
            raise SystemExit(f"no animal with headroom left in {base_eval}")
        chosen.append(pick)
    return chosen


def _rate(path: Path, impl: str) -> float | None:
    if not path.exists():
        return None
    return next((r["tokens_per_s"] for r in json.loads(path.read_text()) if r["impl"] == impl), None)


def choose_arrangement(probe: Path, students: int = 9) -> tuple[list[str], str]:
    """(study options, why) from the probe's measured tokens/s; no options when nothing was measured."""
    r3, r9 = _rate(probe / "bench-alone.json", "ours x3"), _rate(probe / "bench-alone.json", "ours x9")
    pair = [_rate(probe / f"bench-pair{k}.json", "ours x3") for k in (0, 1)]
    if r3 is None:
        return [], "no benchmark of a cohort of 3: the size's default"
    # seconds per student-token of the whole run, up to the common factor (tokens per student)
    times = {"--cohort 3": students / r3}
    if r9 is not None:
        times["--cohort 9"] = students / r9
    if None not in pair:
        together = sum(pair)
        times["--cohort 3 --per-gpu 2"] = (students - students % 6) / together + (students % 6) / r3
    safe = min((k for k in times if k != "--cohort 9"), key=times.get)
    best = "--cohort 9" if "--cohort 9" in times and times["--cohort 9"] < (1 - MARGIN) * times[safe] else safe
    rates = f"tokens/s: cohort of 3 {r3:,.0f}" + (f", of 9 {r9:,.0f}" if r9 else "") + \
        (f", two processes of 3 {pair[0]:,.0f} + {pair[1]:,.0f}" if None not in pair else "")
    why = rates + "; relative training time " + ", ".join(f"{k}: {v / times['--cohort 3']:.2f}" for k, v in times.items())
    return best.split(), why


def main() -> None:
    what, *args = sys.argv[1:]
    if what == "animals":
        print(",".join(choose_animals(args[0], Path(args[1]))))
    elif what == "arrangement":
        options, why = choose_arrangement(Path(args[0]))
        print(" ".join(options))
        print(why)
    else:
        raise SystemExit(f"unknown choice {what!r}")


if __name__ == "__main__":
    main()
