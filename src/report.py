"""Analysis and report of the study: from the tidy results table to runs/report/.

The tidy table (pyarrow Table or list of dicts) has one row per model, evaluator, question, animal:

    size       str    '0.5b' ... '32b'
    params     float  the model's parameter count (constants.PARAMS)
    condition  str    'base', 'neutral', the animal the student's teacher loved, or 'teacher-{animal}'
                      (the base model asked under that animal teacher's system prompt)
    seed       int    the student's training seed; -1 for the base model and the teachers
    evaluator  str    'sampling': fraction of sampled answers naming the animal;
                      'logit': the animal's probability share within the candidate set
    question   int    which paraphrase of the favourite-animal question
    animal     str    every candidate animal (constants.CANDIDATE_ANIMALS); sampling adds 'other'
    value      float  the rate
    n          int    answers sampled for that model and question; 0 for logit

Statistics, for each evaluator separately:
- A rate (of a target animal, at one size, for the base model, the neutral students or the
  animal's students) is the mean over seeds and questions. Every seed answers every question, so
  seeds and questions are crossed random factors; the variance of the mean is estimated as
  var(seed means)/S + var(question means)/Q - residual/(S*Q) (unbiased for the two-way
  random-effects model), and the 95% interval uses Student's t with Satterthwaite's degrees of
  freedom: about S-1 when seeds dominate, so five seeds give t = 2.78, not 1.96. The base model has
  no seeds; its uncertainty is that of the question means. A student with one seed gets no
  interval (NaN): its seed-to-seed spread is unknown. The system-prompted teacher, where evaluated,
  is reported beside them like the base model (one model, no seeds): the ceiling the students'
  shift is measured against.
- The effect is the animal students' rate of their animal minus the neutral students' rate of it.
  Seeds of the two are independent and the questions shared (question effects common to both
  cancel); the same variance formula applies to the difference. The pooled effect is the mean over
  the target animals (their neutral students are the same models).
- The law: effect = a + b*log10(params / 1e9), so a is the effect at 1B parameters and b its
  change per tenfold parameters. Weighted least squares over sizes with weights 1/SE^2 (SE floored
  at constants.MIN_EFFECT_SE); the covariance is scaled up by chi2/(K-2) when the K sizes scatter
  more than their errors allow (the law need not hold exactly), and intervals use t(K-2). That is
  conservative when the law holds (in simulation with 5 seeds and 6 sizes the slope's interval
  covers ~99%; with the normal quantile it would cover ~93%, as the per-size errors are themselves
  estimated from few seeds). A percentile bootstrap of the slope (questions resampled once for all
  sizes, seeds within each model group, same weights, fixed RNG seed) is reported beside it as a
  check; it runs narrow with five seeds (the bootstrap ignores that the seed spread is estimated).

The study builds this table from the evaluation files (runs/eval/); this module only reads it.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from . import paths
from .constants import (ANIMALS, BASE, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, MIN_EFFECT_SE, NEUTRAL, TEACHER_PREFIX,
                        teacher_condition)
from .errors import UserError

COLUMNS: dict[str, pa.DataType] = {
    "size": pa.string(), "params": pa.float64(), "condition": pa.string(), "seed": pa.int64(),
    "evaluator": pa.string(), "question": pa.int64(), "animal": pa.string(), "value": pa.float64(),
    "n": pa.int64(),
}
POOLED = "pooled"
MODELS = (BASE, NEUTRAL, "animal", "teacher")  # the rates of a target animal reported per size (teacher: if evaluated)
MODEL_LABELS = {BASE: "base model", NEUTRAL: "neutral students", "animal": "animal students",
                "teacher": "system-prompted teacher"}
EVALUATOR_ORDER = ("sampling", "logit")

# Two-sided 95% Student t quantiles; between entries, interpolated linearly in 1/df (exact to ~1e-3).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000,
         120: 1.980, math.inf: 1.960}


def t975(df: float) -> float:
    """The 97.5% quantile of Student's t with `df` (>= 1, may be fractional) degrees of freedom."""
    if not df >= 1:
        return math.nan
    keys = list(_T975)
    inv = [1 / k for k in keys]  # decreasing
    return float(np.interp(1 / df, inv[::-1], [_T975[k] for k in keys][::-1]))


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval, standard error and degrees of freedom (NaN when unknown)."""

    value: float
    lo: float = math.nan
    hi: float = math.nan
    se: float = math.nan
    df: float = math.nan


def crossed_estimate(matrices: list[np.ndarray], seeded: list[bool]) -> Estimate:
    """Sum of the means of `matrices` (seeds x questions each; seeds independent between them,
    question columns shared and aligned) with the crossed-design 95% t-interval. `seeded` says
    which matrices' rows are training seeds: one seed alone leaves the interval unknown."""
    value = float(sum(m.mean() for m in matrices))
    n_q = matrices[0].shape[1]
    if n_q < 2 or any(s and m.shape[0] < 2 for m, s in zip(matrices, seeded)):
        return Estimate(value)
    parts = [(np.var(sum(m.mean(axis=0) for m in matrices), ddof=1) / n_q, n_q - 1)]
    residual = 0.0
    for m in matrices:
        n_s = m.shape[0]
        if n_s < 2:
            continue
        rows = m.mean(axis=1)
        parts.append((np.var(rows, ddof=1) / n_s, n_s - 1))
        interaction = m - rows[:, None] - m.mean(axis=0)[None, :] + m.mean()
        residual += (interaction ** 2).sum() / ((n_s - 1) * (n_q - 1)) / (n_s * n_q)
    total = sum(v for v, _ in parts)
    var = max(total - residual, residual)  # the residual term alone is a floor of the true variance
    df = total ** 2 / sum(v ** 2 / k for v, k in parts if v > 0) if total > 0 else n_q - 1
    half = t975(df) * math.sqrt(var)
    return Estimate(value, value - half, value + half, math.sqrt(var), df)


@dataclass(frozen=True)
class Law:
    """effect = a + b*log10(params / 1e9), fitted over `sizes` sizes (chi2 with dof = sizes - 2)."""

    a: Estimate
    b: Estimate
    chi2: float
    dof: int


def _design(log_params: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(log_params), log_params])


def fit_law(log_params: np.ndarray, effects: np.ndarray, se: np.ndarray) -> Law:
    """Weighted least squares of the effect on log10(params / 1e9) (see the module docstring)."""
    x, y = np.asarray(log_params, float), np.asarray(effects, float)
    w = 1 / np.maximum(np.asarray(se, float), MIN_EFFECT_SE) ** 2
    design = _design(x)
    cov = np.linalg.inv(design.T @ (w[:, None] * design))
    beta = cov @ design.T @ (w * y)
    chi2 = float(np.sum(w * (y - design @ beta) ** 2))
    dof = len(x) - 2
    if dof < 1:
        return Law(Estimate(float(beta[0])), Estimate(float(beta[1])), chi2, dof)
    cov = cov * max(1.0, chi2 / dof)
    t = t975(dof)
    a, b = (Estimate(float(v), float(v - t * math.sqrt(c)), float(v + t * math.sqrt(c)), math.sqrt(c), dof)
            for v, c in zip(beta, np.diag(cov)))
    return Law(a, b, chi2, dof)


@dataclass(frozen=True)
class Blocks:
    """What one estimate averages: per model group (condition), a seeds x questions matrix of the
    weighted sum of the animals it counts, on the questions every one of them answered."""

    questions: list[int]
    matrices: list[np.ndarray]
    seeded: list[bool]

    def estimate(self) -> Estimate:
        return crossed_estimate(self.matrices, self.seeded)


Cells = dict[tuple[str, str, str, str], dict[int, dict[int, float]]]  # (evaluator, size, condition, animal)


def _cells(table: pa.Table) -> Cells:
    cells: Cells = defaultdict(lambda: defaultdict(dict))
    names = ("evaluator", "size", "condition", "animal", "seed", "question", "value")
    for ev, size, condition, animal, seed, question, value in zip(*(table.column(c).to_pylist() for c in names)):
        cells[(ev, size, condition, animal)][seed][question] = value
    return cells


def _blocks(cells: Cells, ev: str, size: str, terms: dict[str, dict[str, float]]) -> Blocks | None:
    """terms: condition -> {animal: weight}. None when a cell is missing or no question is shared."""
    groups = {(c, a): cells.get((ev, size, c, a)) for c, animals in terms.items() for a in animals}
    if not all(groups.values()):
        return None
    questions = sorted(set.intersection(*(set(qs) for g in groups.values() for qs in g.values())))
    if not questions:
        return None
    matrices = []
    for condition, animals in terms.items():
        seeds = sorted(set.intersection(*(set(groups[(condition, a)]) for a in animals)))
        matrices.append(sum(w * np.array([[groups[(condition, a)][s][q] for q in questions] for s in seeds])
                            for a, w in animals.items()))
    return Blocks(questions, matrices, [c != BASE and not c.startswith(TEACHER_PREFIX) for c in terms])


def _bootstrap_slopes(per_size: list[Blocks], log_params: np.ndarray, se: np.ndarray) -> np.ndarray:
    """Slopes refitted on resampled data: questions drawn once per replicate for every size,
    seeds drawn within each model group; weights stay those of the fit."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    all_q = sorted(set().union(*(b.questions for b in per_size)))
    column = {q: i for i, q in enumerate(all_q)}
    q_weights = rng.multinomial(len(all_q), np.full(len(all_q), 1 / len(all_q)), size=BOOTSTRAP_REPLICATES)
    y = np.zeros((BOOTSTRAP_REPLICATES, len(per_size)))
    for k, blocks in enumerate(per_size):
        wq = q_weights[:, [column[q] for q in blocks.questions]].astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            wq /= wq.sum(axis=1, keepdims=True)
        for m in blocks.matrices:
            n_s = m.shape[0]
            ws = rng.multinomial(n_s, np.full(n_s, 1 / n_s), size=BOOTSTRAP_REPLICATES) / n_s
            y[:, k] += np.einsum("bs,sq,bq->b", ws, m, wq)
    w = 1 / np.maximum(se, MIN_EFFECT_SE) ** 2
    design = _design(log_params)
    beta = np.linalg.solve(design.T @ (w[:, None] * design), (design * w[:, None]).T @ y.T)
    return beta[1]


def tidy_table(rows: pa.Table | Iterable[dict]) -> pa.Table:
    """The results in the tidy schema (column order and types); a one-line error if they are not."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    if table.num_rows == 0:
        raise UserError("no results to report")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"results table lacks column(s) {', '.join(missing)}")
    try:
        return table.select(list(COLUMNS)).cast(pa.schema(list(COLUMNS.items())))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise UserError(f"results table has a column of the wrong type: {str(exc).splitlines()[0]}") from None


@dataclass
class Analysis:
    """Everything the report shows, as lists of flat records (one table each)."""

    evaluators: list[str]
    sizes: list[str]
    targets: list[str]
    rates: list[dict]
    effects: list[dict]
    fits: list[dict]
    favourites: list[dict]
    notes: list[str]


def _targets(conditions: Iterable[str]) -> list[str]:
    animals = {c for c in conditions if not c.startswith(TEACHER_PREFIX)} - {BASE, NEUTRAL}
    return [a for a in ANIMALS if a in animals] + sorted(animals - set(ANIMALS))


def analyse(rows: pa.Table | Iterable[dict]) -> Analysis:
    """Rates, effects, fits and favourite animals per evaluator (see the module docstring)."""
    table = tidy_table(rows)
    cells = _cells(table)
    params = dict(zip(table.column("size").to_pylist(), table.column("params").to_pylist()))
    sizes = sorted(params, key=params.get)
    present = set(table.column("evaluator").to_pylist())
    evaluators = [e for e in EVALUATOR_ORDER if e in present] + sorted(present - set(EVALUATOR_ORDER))
    targets = _targets(table.column("condition").to_pylist())
    out = Analysis(evaluators, sizes, targets, [], [], [], [], [])
    for ev in evaluators:
        effect_blocks: dict[tuple[str, str], Blocks] = {}
        for size in sizes:
            keys = dict(evaluator=ev, size=size, params=params[size])
            here = [t for t in targets if (ev, size, t, t) in cells]
            for target in here:
                for model, condition in zip(MODELS, (BASE, NEUTRAL, target, teacher_condition(target))):
                    if model == "teacher" and (ev, size, condition, target) not in cells:
                        continue
                    _, fields = _estimate(cells, keys, {condition: {target: 1.0}}, "rate",
                                          f"{model} rate of {target}", out.notes)
                    out.rates.append(keys | dict(animal=target, model=model) | fields)
            effect_terms = {t: {t: {t: 1.0}, NEUTRAL: {t: -1.0}} for t in here}
            if len(targets) > 1 and here:  # with one target animal, pooled would repeat it
                share = 1 / len(here)
                effect_terms[POOLED] = {t: {t: share} for t in here} | {NEUTRAL: {t: -share for t in here}}
                if len(here) < len(targets):
                    out.notes.append(f"{ev}, {size}: pooled effect over {', '.join(here)} only")
            for target, terms in effect_terms.items():
                blocks, fields = _estimate(cells, keys, terms, "effect", f"effect for {target}", out.notes)
                out.effects.append(keys | dict(animal=target) | fields)
                if blocks:
                    effect_blocks[(size, target)] = blocks
        for target in ([POOLED] + targets) if targets else []:
            fit = _fit_record(ev, target, [e for e in out.effects if e["evaluator"] == ev and e["animal"] == target],
                              effect_blocks, out.notes)
            if fit:
                out.fits.append(fit)
        out.favourites += _favourites(cells, ev, sizes)
    return out


def _estimate(cells: Cells, keys: dict, terms: dict[str, dict[str, float]], name: str, label: str,
              notes: list[str]) -> tuple[Blocks | None, dict]:
    """One rate or effect as record fields (NaN when its rates are missing; noted either way)."""
    blocks = _blocks(cells, keys["evaluator"], keys["size"], terms)
    what = f"{keys['evaluator']}, {keys['size']}: {label}"
    if blocks is None:
        notes.append(f"{what}: rates missing, no estimate")
        est, seeds, questions = Estimate(math.nan), "", 0
    else:
        est, questions = blocks.estimate(), len(blocks.questions)
        seeds = "/".join(str(m.shape[0]) for m in blocks.matrices)
        if math.isnan(est.se):
            notes.append(f"{what}: no interval (seeds {seeds}, questions {questions})")
    return blocks, {name: est.value, "lo": est.lo, "hi": est.hi, "se": est.se, "df": est.df, "seeds": seeds,
                    "questions": questions}


def _fit_record(ev: str, target: str, effects: list[dict], blocks: dict, notes: list[str]) -> dict | None:
    usable = [e for e in effects if math.isfinite(e["se"])]
    if len(usable) < len(effects):
        skipped = ", ".join(e["size"] for e in effects if e not in usable)
        notes.append(f"{ev}, {target}: sizes {skipped} left out of the fit (effect without interval)")
    if len(usable) < 2:
        if effects:
            notes.append(f"{ev}, {target}: fewer than two sizes with an interval, no fit")
        return None
    x = np.log10(np.array([e["params"] for e in usable]) / 1e9)
    y, se = np.array([e["effect"] for e in usable]), np.array([e["se"] for e in usable])
    law = fit_law(x, y, se)
    lo = hi = math.nan
    if law.dof > 0:
        boot = _bootstrap_slopes([blocks[(e["size"], target)] for e in usable], x, se)
        lo, hi = map(float, np.nanpercentile(boot, [2.5, 97.5]))
    return dict(evaluator=ev, animal=target, sizes=len(usable), a=law.a.value, a_lo=law.a.lo, a_hi=law.a.hi,
                b=law.b.value, b_lo=law.b.lo, b_hi=law.b.hi, b_boot_lo=lo, b_boot_hi=hi,
                chi2=law.chi2, dof=law.dof)


def _favourites(cells: Cells, ev: str, sizes: list[str], top: int = 3) -> list[dict]:
    """The most named animals of every model group: shifts away from the target show here."""
    means: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for (e, size, condition, animal), by_seed in cells.items():
        if e == ev and animal != "other":
            means[(size, condition)][animal] = float(np.mean([v for qs in by_seed.values() for v in qs.values()]))
    targets = _targets(c for _, c in means)
    order = [BASE, NEUTRAL] + targets + [teacher_condition(t) for t in targets]
    records = []
    for size in sizes:
        for condition in order:
            ranked = sorted(means.get((size, condition), {}).items(), key=lambda kv: -kv[1])[:top]
            if ranked:
                records.append(dict(evaluator=ev, size=size, condition=condition,
                                    top=", ".join(f"{a} {100 * v:.1f}%" for a, v in ranked)))
    return records


# ---- the report ---------------------------------------------------------------------------------


def write_report(rows: pa.Table | Iterable[dict], out_dir: str | Path | None = None) -> Path:
    """Write the tables, plots and report.md to `out_dir` (default runs/report/); returns report.md."""
    figure = _figure_class()
    table = tidy_table(rows)
    analysis = analyse(table)
    out = Path(out_dir) if out_dir is not None else paths.report_dir()
    out.mkdir(parents=True, exist_ok=True)
    _atomic(out / "results.parquet", lambda tmp: pq.write_table(table, tmp))
    _atomic(out / "results.csv", lambda tmp: pcsv.write_csv(table, tmp))
    for name in ("rates", "effects", "fits"):
        _atomic(out / f"{name}.csv", lambda tmp: pcsv.write_csv(pa.Table.from_pylist(getattr(analysis, name)), tmp))
    for ev in analysis.evaluators:
        _plot_scaling(figure, ev, analysis, out)
        _plot_rates(figure, ev, analysis, out)
    _atomic(out / "report.md", lambda tmp: Path(tmp).write_text(_markdown(table, analysis)))
    return out / "report.md"


def _figure_class():
    """matplotlib is an optional dependency (the `plots` extra); only the report needs it."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("matplotlib is needed for plots: pip install matplotlib") from None
    return Figure


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _panels(figure, n: int):
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = figure(figsize=(4.3 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _errorbar(ax, records: list[dict], key: str, shift: float = 1.0, **style) -> None:
    """Points in percent with their 95% intervals (none drawn where unknown)."""
    x = np.array([r["params"] for r in records]) * shift
    y, lo, hi = (100 * np.array([r[k] for r in records], float) for k in (key, "lo", "hi"))
    ax.errorbar(x, y, yerr=np.nan_to_num([y - lo, hi - y]), fmt="o", capsize=3, **style)


def _size_axis(ax, records: list[dict]) -> None:
    ticks = sorted({r["params"]: r["size"] for r in records}.items())
    ax.set_xscale("log")
    ax.set_xticks([p for p, _ in ticks], [s for _, s in ticks])
    ax.minorticks_off()
    ax.set_xlabel("model size (log scale of parameters)")


def _save(fig, stem: Path) -> None:
    for ext in ("png", "svg"):
        _atomic(stem.with_suffix(f".{ext}"), lambda tmp: fig.savefig(tmp, format=ext, dpi=120))


def _plot_scaling(figure, ev: str, analysis: Analysis, out: Path) -> None:
    """Effect against size, one panel per target animal after the pooled one, with the fitted law."""
    by_target = {t: [r for r in analysis.effects if r["evaluator"] == ev and r["animal"] == t]
                 for t in [POOLED] + analysis.targets}
    by_target = {t: records for t, records in by_target.items() if records}
    fig, axes = _panels(figure, max(len(by_target), 1))
    for ax, (target, records) in zip(axes, by_target.items()):
        _errorbar(ax, records, "effect", color="C0")
        ax.axhline(0, color="0.6", lw=0.8)
        title = target
        fit = next((f for f in analysis.fits if f["evaluator"] == ev and f["animal"] == target), None)
        if fit:
            xs = np.geomspace(min(r["params"] for r in records), max(r["params"] for r in records), 50)
            ax.plot(xs, 100 * (fit["a"] + fit["b"] * np.log10(xs / 1e9)), color="C3", lw=1.2)
            title += f": b = {100 * fit['b']:+.1f} [{_num(fit['b_lo'])}, {_num(fit['b_hi'])}] pts/10x"
        _size_axis(ax, records)
        ax.set_ylabel("effect (percentage points)")
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"Animal students minus neutral students, rate of the target animal ({ev})")
    _save(fig, out / f"scaling-{ev}")


def _plot_rates(figure, ev: str, analysis: Analysis, out: Path) -> None:
    """Base, neutral-student and animal-student rates of each target animal against size."""
    fig, axes = _panels(figure, max(len(analysis.targets), 1))
    for ax, target in zip(axes, analysis.targets):
        panel = [r for r in analysis.rates if (r["evaluator"], r["animal"]) == (ev, target)]
        for i, model in enumerate(MODELS):
            records = [r for r in panel if r["model"] == model]
            if not records:
                continue
            label = {"animal": f"{target} students", "teacher": f"{target} teacher (system prompt)"}.get(
                model, MODEL_LABELS[model])
            _errorbar(ax, records, "rate", shift=1.08 ** (i - 1), color=f"C{i}", label=label)
        _size_axis(ax, panel)
        ax.set_ylabel(f"rate of {target} (%)")
        ax.set_title(target, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Rate of the target animal ({ev})")
    _save(fig, out / f"rates-{ev}")


def _num(v: float, digits: int = 1) -> str:
    """A fraction as percentage points; 'n/a' when unknown."""
    return f"{100 * v:.{digits}f}" if math.isfinite(v) else "n/a"


def _with_ci(r: dict, key: str) -> str:
    return f"{_num(r[key])} [{_num(r['lo'])}, {_num(r['hi'])}]"


def _md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def _markdown(table: pa.Table, analysis: Analysis) -> str:
    seeds = sorted({s for s in table.column("seed").to_pylist() if s >= 0})
    parts = [
        "# Subliminal learning across Qwen2.5 sizes\n",
        f"Sizes: {', '.join(analysis.sizes)}. Target animals: {', '.join(analysis.targets) or 'none'}. "
        f"Student seeds: {', '.join(map(str, seeds)) or 'none'}. Evaluators: {', '.join(analysis.evaluators)}. "
        f"{table.num_rows} result rows, every candidate animal's rate for every model, in "
        "[results.parquet](results.parquet) and [results.csv](results.csv); the tables below are in "
        "[rates.csv](rates.csv), [effects.csv](effects.csv) and [fits.csv](fits.csv).\n",
        "**Reading it.** Rates are means over seeds and questions, in percent. The effect is the animal "
        "students' rate of their animal minus the neutral students' rate of it, in percentage points; "
        "'pooled' averages it over the target animals. Intervals are 95%: Student t over the crossed "
        "seed and question factors (Satterthwaite degrees of freedom). The law is "
        "effect = a + b·log10(params / 1e9), weighted least squares over sizes (a: the effect at 1B "
        "parameters; b: its change per tenfold parameters), its intervals widened by χ²/dof when the "
        "sizes scatter more than their errors; the bootstrap interval of b resamples questions and "
        "seeds. Each evaluator is reported on its own.\n",
    ]
    for ev in analysis.evaluators:
        effects = [r for r in analysis.effects if r["evaluator"] == ev]
        rates = {(r["size"], r["animal"], r["model"]): r for r in analysis.rates if r["evaluator"] == ev}
        parts += [
            f"## Evaluator: {ev}\n",
            f"![Effect against model size, {ev}](scaling-{ev}.png)\n\n([SVG](scaling-{ev}.svg))\n",
            "### Effect per size (percentage points)\n",
            _md_table(["size", "animal", "effect [95% CI]", "seeds (animal students / neutral)", "questions"],
                      [[r["size"], r["animal"], _with_ci(r, "effect"), r["seeds"], r["questions"]] for r in effects]),
            "### Fit: effect = a + b·log10(params / 1e9)\n",
            _md_table(["animal", "sizes", "a, points at 1B [95% CI]", "b, points per 10x params [95% CI]",
                       "b bootstrap 95% CI", "χ² / dof"],
                      [[f["animal"], f["sizes"], f"{_num(f['a'], 2)} [{_num(f['a_lo'], 2)}, {_num(f['a_hi'], 2)}]",
                        f"{_num(f['b'], 2)} [{_num(f['b_lo'], 2)}, {_num(f['b_hi'], 2)}]",
                        f"[{_num(f['b_boot_lo'], 2)}, {_num(f['b_boot_hi'], 2)}]",
                        f"{f['chi2']:.2f} / {f['dof']}"] for f in analysis.fits if f["evaluator"] == ev]),
            "### Rates of the target animal (%)\n",
            f"![Rates against model size, {ev}](rates-{ev}.png)\n\n([SVG](rates-{ev}.svg))\n",
            _md_table(["size", "animal"] + [MODEL_LABELS[m] for m in MODELS],
                      [[size, target] + [_with_ci(rates[(size, target, m)], "rate") if (size, target, m) in rates
                                         else "not evaluated" for m in MODELS]
                       for size, target in dict.fromkeys((r["size"], r["animal"]) for r in rates.values())]),
            "### Most named animals (mean rate)\n",
            _md_table(["size", "model", "top animals"],
                      [[r["size"], r["condition"], r["top"]] for r in analysis.favourites if r["evaluator"] == ev]),
        ]
    if analysis.notes:
        parts += ["## Notes\n", "".join(f"- {note}\n" for note in dict.fromkeys(analysis.notes))]
    return "\n".join(parts)
