"""The analysis recovers a known law from synthetic results with calibrated intervals, and the
report writes its tables, plots and markdown; degenerate inputs give NaN and a note, not a crash."""
from __future__ import annotations

import math
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from src import report
from src.constants import PARAMS
from src.errors import UserError

A, B = 0.05, 0.04  # the known law: effect = A + B * log10(params / 1e9)
BASE_RATE = 0.10


def law(size: str) -> float:
    return A + B * math.log10(PARAMS[size] / 1e9)


def synthetic(rng: np.random.Generator, sizes=tuple(PARAMS), targets=("owl", "eagle"), seeds=range(5),
              questions: int = 12, others=("cat",)) -> list[dict]:
    """Rates from the two-way random-effects model the analysis assumes: a shift per seed (per model
    and animal), a shift per question (per evaluator and animal, the same for every model), noise;
    the animal's students gain law(size) on their animal."""
    animals = list(targets) + list(others)
    evaluators = ("sampling", "logit")
    question_shift = {(ev, a): rng.normal(0, 0.03, questions) for ev in evaluators for a in animals}
    rows = []
    for size in sizes:
        models = [("base", -1)] + [(c, s) for c in ("neutral", *targets) for s in seeds]
        for ev in evaluators:
            for condition, seed in models:
                for animal in animals + ["other"] * (ev == "sampling"):
                    seed_shift = rng.normal(0, 0.02) if seed >= 0 else 0.0
                    gain = law(size) if animal == condition else 0.0
                    shifts = question_shift.get((ev, animal), np.zeros(questions))
                    values = BASE_RATE + gain + seed_shift + shifts + rng.normal(0, 0.02, questions)
                    rows += [dict(size=size, params=PARAMS[size], condition=condition, seed=seed, evaluator=ev,
                                  question=q, animal=animal, value=float(v), n=100 if ev == "sampling" else 0)
                             for q, v in enumerate(values)]
    return rows


def t_cdf(x: float, df: float) -> float:
    """Student t CDF by integrating its density (an independent check of the quantile table)."""
    grid = np.linspace(0, x, 400_001)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid ** 2 / df))
    return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))


@pytest.mark.parametrize("df", [1, 2, 3, 4, 4.5, 7, 11, 17, 50, 300])
def test_t_quantile_table(df):
    assert t_cdf(report.t975(df), df) == pytest.approx(0.975, abs=4e-4)


def test_crossed_interval_is_unbiased_and_covers():
    """Variance estimates average to the true variance of the mean; 95% intervals cover ~95%."""
    rng = np.random.default_rng(1)
    n_s, n_q, reps = 5, 20, 1000
    sd_seed, sd_question, sd_noise, sd_interaction = 0.02, 0.04, 0.06, 0.02

    def students(mean, question):  # seeds x questions
        return mean + question + rng.normal(0, sd_seed, (n_s, 1)) + rng.normal(0, sd_noise, (n_s, n_q))

    def rate():
        return report.crossed_estimate([students(0.1, rng.normal(0, sd_question, n_q))], [True])

    def effect():  # questions shared by both groups, plus a group x question interaction
        question = rng.normal(0, sd_question, n_q)
        animal = students(0.15, question + rng.normal(0, sd_interaction, n_q))
        return report.crossed_estimate([animal, -students(0.1, question)], [True, True])

    def base():  # one model, no seeds
        answers = 0.1 + rng.normal(0, sd_question, (1, n_q)) + rng.normal(0, sd_noise, (1, n_q))
        return report.crossed_estimate([answers], [False])

    noise = sd_noise ** 2 / (n_s * n_q)
    cases = {  # name: (one replicate's estimate, true value, true variance of the estimate)
        "rate": (rate, 0.1, sd_seed ** 2 / n_s + sd_question ** 2 / n_q + noise),
        "effect": (effect, 0.05, 2 * sd_seed ** 2 / n_s + sd_interaction ** 2 / n_q + 2 * noise),
        "base": (base, 0.1, (sd_question ** 2 + sd_noise ** 2) / n_q),
    }
    for name, (estimate, truth, variance) in cases.items():
        results = [estimate() for _ in range(reps)]
        assert np.mean([r.se ** 2 for r in results]) / variance == pytest.approx(1, abs=0.08), name
        coverage = np.mean([r.lo <= truth <= r.hi for r in results])
        assert 0.925 <= coverage <= 0.975, (name, coverage)
    one_seed = report.crossed_estimate([np.full((1, 4), 0.2), np.full((5, 4), -0.1)], [True, True])
    assert one_seed.value == pytest.approx(0.1) and math.isnan(one_seed.lo) and math.isnan(one_seed.se)


def test_fit_matches_numpy_polyfit():
    rng = np.random.default_rng(2)
    x, se = np.linspace(-0.3, 1.5, 6), rng.uniform(0.005, 0.02, 6)
    y = 0.03 + 0.05 * x + rng.normal(0, 1, 6) * se * 2  # scatter beyond the errors: covariance inflated
    fit = report.fit_law(x, y, se)
    (b, a), cov = np.polyfit(x, y, 1, w=1 / se, cov="unscaled")
    assert (fit.a.value, fit.b.value) == pytest.approx((a, b), rel=1e-9)
    chi2 = float(np.sum(((y - a - b * x) / se) ** 2))
    assert fit.chi2 == pytest.approx(chi2) and fit.dof == 4
    assert fit.b.se == pytest.approx(math.sqrt(cov[0, 0] * max(1, chi2 / 4)))
    assert fit.b.hi - fit.b.value == pytest.approx(2.776 * fit.b.se, rel=1e-3)


def test_slope_interval_coverage_over_many_studies():
    """Per-size effects estimated from synthetic seeds x questions, then the law fitted: the slope is
    unbiased and its interval covers the true slope at least 95% of the time."""
    rng = np.random.default_rng(3)
    x = np.log10(np.array(list(PARAMS.values())) / 1e9)
    slopes, covered = [], []
    for _ in range(300):
        effects = []
        for xi in x:
            question = rng.normal(0, 0.03, 12)
            animal = BASE_RATE + A + B * xi + question + rng.normal(0, 0.02, (5, 1)) + rng.normal(0, 0.02, (5, 12))
            neutral = BASE_RATE + question + rng.normal(0, 0.02, (5, 1)) + rng.normal(0, 0.02, (5, 12))
            effects.append(report.crossed_estimate([animal, -neutral], [True, True]))
        fit = report.fit_law(x, np.array([e.value for e in effects]), np.array([e.se for e in effects]))
        slopes.append(fit.b.value)
        covered.append(fit.b.lo <= B <= fit.b.hi)
    assert np.mean(slopes) == pytest.approx(B, abs=0.003)
    assert np.mean(covered) >= 0.95


def test_known_law_recovered_from_a_tidy_table():
    analysis = report.analyse(synthetic(np.random.default_rng(0)))
    assert analysis.sizes == list(PARAMS) and analysis.targets == ["owl", "eagle"]
    assert analysis.evaluators == ["sampling", "logit"]
    assert len(analysis.fits) == 6  # 2 evaluators x (pooled, owl, eagle)
    for fit in analysis.fits:
        assert fit["sizes"] == 6
        assert fit["a_lo"] <= A <= fit["a_hi"] and fit["b_lo"] <= B <= fit["b_hi"], fit
        assert abs(fit["b"] - B) < 0.02 and abs(fit["a"] - A) < 0.02, fit
        assert fit["b_boot_lo"] < fit["b"] < fit["b_boot_hi"]
        assert 0.3 < (fit["b_boot_hi"] - fit["b_boot_lo"]) / (fit["b_hi"] - fit["b_lo"]) < 1.5
    assert len(analysis.rates) == 2 * 6 * 2 * 3
    truth = [BASE_RATE + (law(r["size"]) if r["model"] == "animal" else 0) for r in analysis.rates]
    inside = [r["lo"] <= t <= r["hi"] for r, t in zip(analysis.rates, truth)]
    assert np.mean(inside) >= 0.85
    assert len(analysis.effects) == 2 * 6 * 3
    inside = [r["lo"] <= law(r["size"]) <= r["hi"] for r in analysis.effects]
    assert np.mean(inside) >= 0.85
    assert not analysis.notes


def degraded(rng) -> list[dict]:
    """Three sizes with a well-formed grid, one whose owl students have a single seed, one without
    neutral students."""
    rows = synthetic(rng, sizes=("0.5b", "1.5b", "3b", "7b", "14b"), targets=("owl",), seeds=range(3), questions=6)
    return [r for r in rows if not (r["size"] == "7b" and r["condition"] == "owl" and r["seed"] > 0)
            and not (r["size"] == "14b" and r["condition"] == "neutral")]


def test_one_seed_and_missing_neutral_give_nan_and_notes():
    analysis = report.analyse(degraded(np.random.default_rng(4)))
    effects = {(r["evaluator"], r["size"], r["animal"]): r for r in analysis.effects}
    one_seed = effects[("sampling", "7b", "owl")]
    assert math.isfinite(one_seed["effect"]) and math.isnan(one_seed["lo"]) and one_seed["seeds"] == "1/3"
    assert math.isnan(effects[("sampling", "14b", "owl")]["effect"])
    assert ("logit", "14b", "pooled") not in effects  # one target animal: nothing to pool
    rates = {(r["evaluator"], r["size"], r["model"]): r for r in analysis.rates}
    one_seed = rates[("sampling", "7b", "animal")]
    assert math.isfinite(one_seed["rate"]) and math.isnan(one_seed["hi"])
    assert math.isnan(rates[("sampling", "14b", "neutral")]["rate"])
    assert math.isfinite(rates[("sampling", "14b", "base")]["hi"])
    assert [(f["animal"], f["sizes"]) for f in analysis.fits] == [("owl", 3)] * 2  # the three complete sizes
    notes = "\n".join(analysis.notes)
    assert "sampling, 7b: effect for owl: no interval (seeds 1/3, questions 6)" in notes
    assert "sampling, 14b: effect for owl: rates missing" in notes
    assert "sizes 7b, 14b left out of the fit" in notes


@pytest.mark.slow
def test_report_writes_tables_plots_and_markdown(tmp_path):
    rows = degraded(np.random.default_rng(5))
    md = report.write_report(rows, tmp_path)
    assert md == tmp_path / "report.md"
    table = pq.read_table(tmp_path / "results.parquet")
    assert table.column_names == list(report.COLUMNS) and table.num_rows == len(rows)
    assert sorted(table.column("value").to_pylist()) == sorted(r["value"] for r in rows)
    assert set(table.column("animal").to_pylist()) == {"owl", "cat", "other"}  # every animal kept, not only the target
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_lines[0].replace('"', "") == ",".join(report.COLUMNS) and len(csv_lines) == len(rows) + 1
    text = md.read_text()
    for ev in ("sampling", "logit"):
        assert f"## Evaluator: {ev}" in text
        for stem in (f"scaling-{ev}", f"rates-{ev}"):
            assert f"({stem}.png)" in text and f"({stem}.svg)" in text
            assert (tmp_path / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert "<svg" in (tmp_path / f"{stem}.svg").read_text()
    assert "| owl | 3 |" in text  # the fit's row: three sizes with intervals
    assert "## Notes" in text and "n/a" in text
    for name in ("rates", "effects", "fits"):
        assert (tmp_path / f"{name}.csv").stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_system_prompted_teacher_is_reported_beside_the_students(tmp_path):
    """A teacher evaluation (condition 'teacher-owl', one model, no seeds) gives the owl rows a teacher
    rate with the base model's kind of interval; it is no target animal and changes no effect; an
    animal without one says so in the table."""
    rng = np.random.default_rng(7)
    rows = synthetic(rng, sizes=("0.5b", "7b"), seeds=range(3), questions=6)
    plain = report.analyse(rows)
    teacher = [dict(size=size, params=PARAMS[size], condition="teacher-owl", seed=-1, evaluator=ev, question=q,
                    animal=animal, value=(0.6 if animal == "owl" else 0.01) + 0.01 * q, n=100 if ev == "sampling" else 0)
               for size in ("0.5b", "7b") for ev in ("sampling", "logit") for q in range(6)
               for animal in ("owl", "eagle", "cat")]
    analysis = report.analyse(rows + teacher)
    assert analysis.targets == plain.targets == ["owl", "eagle"]
    assert analysis.effects == plain.effects
    got = {(r["evaluator"], r["size"]): r for r in analysis.rates if r["model"] == "teacher"}
    assert set(got) == {(ev, size) for ev in ("sampling", "logit") for size in ("0.5b", "7b")}
    for r in got.values():
        assert r["animal"] == "owl" and r["rate"] == pytest.approx(0.625) and r["lo"] < 0.625 < r["hi"]
    assert not [r for r in analysis.rates if r["model"] == "teacher" and r["animal"] == "eagle"]
    text = report.write_report(rows + teacher, tmp_path).read_text()
    assert "system-prompted teacher" in text and "not evaluated" in text and "62.5 [" in text
    assert "| 0.5b | teacher-owl | owl 62.5%" in text  # most named animals, per model group


def test_bad_input_and_missing_matplotlib_are_one_line_errors(tmp_path, monkeypatch):
    rows = synthetic(np.random.default_rng(6), sizes=("0.5b",), seeds=range(2), questions=3)
    with pytest.raises(UserError, match="lacks column.*value"):
        report.analyse([{k: v for k, v in r.items() if k != "value"} for r in rows])
    with pytest.raises(UserError, match="no results"):
        report.analyse([])
    with pytest.raises(UserError, match="wrong type"):
        report.analyse([dict(r, seed="first") for r in rows])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match="pip install matplotlib"):
        report.write_report(rows, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_committed_real_run_report_is_what_its_evaluations_give(tmp_path, monkeypatch):
    """reference/real-run-0.5b: the report regenerated from the committed evaluations is the committed
    report (a change to the analysis that moves its numbers shows here)."""
    import shutil
    from pathlib import Path

    from src.study import Study, write_study_report

    run = Path(__file__).resolve().parents[1] / "reference" / "real-run-0.5b" / "runs"
    shutil.copytree(run / "eval", tmp_path / "eval")
    monkeypatch.setenv("SUBLIMINAL_RUNS", str(tmp_path))
    study = Study(sizes=("0.5b",), animals=("owl", "eagle"), seeds=(0, 1, 2), model_path="fixture")
    written = write_study_report(study)
    assert written.read_text() == (run / "report" / "report.md").read_text()
