"""Paired statistics for the accuracy benchmark: methods compared on the same test cases and the same seeds.

Data layout: ``scores[method][seed][case] = value`` (e.g. test Dice of one trained model on one test case). Every
comparison is paired: a method's value on (case, seed) is compared with the reference's value on the same test
case from the training run with the same seed, so case difficulty and seed luck cancel out.

The confidence intervals are percentile bootstraps over *cases and seeds* (a two-way bootstrap): each replicate
draws the test cases with replacement and, independently, the seeds with replacement, and recomputes the statistic
on the resampled (case, seed) grid. With one seed the seed draw is trivial and the interval is over cases only;
it then says nothing about seed-to-seed variation, and the summary says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Scores = Dict[str, Dict[str, float]]   # seed -> case -> value

DEFAULT_REPLICATES = 10000
DEFAULT_RNG_SEED = 0


def common_grid(*method_scores: Scores) -> Tuple[List[str], List[str]]:
    """Seeds and cases present in every given method (sorted), so that every value has its pair."""
    seeds = sorted(set.intersection(*(set(s) for s in method_scores)), key=str)
    cases = sorted(set.intersection(*(set(s[seed]) for s in method_scores for seed in seeds))) if seeds else []
    return seeds, cases


def as_matrix(scores: Scores, seeds: Sequence[str], cases: Sequence[str]) -> np.ndarray:
    """(seeds x cases) array of the values."""
    return np.array([[float(scores[s][c]) for c in cases] for s in seeds], dtype=float)


def bootstrap_interval(matrices: Sequence[np.ndarray], statistic: Callable[..., np.ndarray], level: float = 0.95,
                       replicates: int = DEFAULT_REPLICATES, rng_seed: int = DEFAULT_RNG_SEED
                       ) -> Tuple[float, float, int]:
    """Percentile interval of ``statistic(*resampled_matrices)`` under the two-way (seed, case) bootstrap.

    All matrices (seeds x cases, same shape) are resampled with the SAME row and column draws, which keeps the
    pairing. ``statistic`` reduces the last two axes (it gets arrays of shape (replicates, seeds, cases)).
    Returns (low, high, number of replicates whose statistic was finite); replicates where the statistic is
    undefined (e.g. a zero denominator) are left out.
    """
    shape = matrices[0].shape
    if any(m.shape != shape for m in matrices):
        raise ValueError(f'matrices differ in shape: {[m.shape for m in matrices]}')
    n_seeds, n_cases = shape
    rng = np.random.default_rng(rng_seed)
    rows = rng.integers(0, n_seeds, (replicates, n_seeds))[:, :, None]
    cols = rng.integers(0, n_cases, (replicates, n_cases))[:, None, :]
    values = np.asarray(statistic(*(m[rows, cols] for m in matrices)), dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float('nan'), float('nan'), 0
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha)), int(finite.size)


def mean_difference(method: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean over the (seed, case) grid (the last two axes) of method - reference."""
    return np.mean(method - reference, axis=(-2, -1))


def gap_closed(method: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """(mean(method) - mean(lower)) / (mean(upper) - mean(lower)) over the last two axes; NaN where the gap is
    not positive."""
    gap = np.mean(upper, axis=(-2, -1)) - np.mean(lower, axis=(-2, -1))
    gain = np.mean(method, axis=(-2, -1)) - np.mean(lower, axis=(-2, -1))
    with np.errstate(divide='ignore', invalid='ignore'):
        return np.where(gap > 0, gain / np.where(gap > 0, gap, 1.0), np.nan)


@dataclass
class SeedSummary:
    """Mean over seeds of each seed's mean test value, and its standard deviation over seeds (ddof 1)."""
    mean: float
    std: float            # NaN with one seed
    per_seed: Dict[str, float]


def summarise_over_seeds(scores: Scores) -> SeedSummary:
    per_seed = {seed: float(np.mean([v for v in cases.values() if math.isfinite(v)]))
                if any(math.isfinite(v) for v in cases.values()) else float('nan')
                for seed, cases in scores.items()}
    values = [v for v in per_seed.values() if math.isfinite(v)]
    mean = float(np.mean(values)) if values else float('nan')
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float('nan')
    return SeedSummary(mean, std, per_seed)


@dataclass
class PairedComparison:
    """``method`` against ``reference`` on the common (seed, case) grid."""
    seeds: List[str]
    cases: List[str]
    difference: float                 # mean over pairs of method - reference
    difference_ci: Tuple[float, float]
    wins: int                         # pairs where method > reference
    ties: int
    pairs: int
    gap_closed: Optional[float] = None
    gap_closed_ci: Optional[Tuple[float, float]] = None
    gap_closed_defined_share: Optional[float] = None  # share of bootstrap replicates with a positive gap
    gap_closed_seeds: Optional[List[str]] = None  # seeds where the upper reference exists (may be fewer)

    @property
    def separated(self) -> bool:
        """True when the interval of the difference excludes zero."""
        low, high = self.difference_ci
        return bool(low > 0 or high < 0)


def compare(method: Scores, reference: Scores, upper: Optional[Scores] = None, level: float = 0.95,
            replicates: int = DEFAULT_REPLICATES, rng_seed: int = DEFAULT_RNG_SEED) -> PairedComparison:
    """Paired difference of ``method`` to ``reference`` (and, with ``upper``, the share of the gap
    reference -> upper that the method closes), with two-way bootstrap intervals."""
    # The difference uses every pair the two methods share; the gap closed needs the upper reference too,
    # so it is computed on that (possibly smaller) grid instead of shrinking the difference's grid to it.
    seeds, cases = common_grid(method, reference)
    if not seeds or not cases:
        raise ValueError('no (seed, case) pair is shared by the compared methods')
    m, r = as_matrix(method, seeds, cases), as_matrix(reference, seeds, cases)
    diff = m - r
    result = PairedComparison(
        seeds=seeds, cases=cases, difference=float(mean_difference(m, r)),
        difference_ci=bootstrap_interval([m, r], mean_difference, level, replicates, rng_seed)[:2],
        wins=int(np.sum(diff > 0)), ties=int(np.sum(diff == 0)), pairs=int(diff.size))
    if upper is not None:
        gap_seeds, gap_cases = common_grid(method, reference, upper)
        if gap_seeds and gap_cases:
            gm, gr, gu = (as_matrix(x, gap_seeds, gap_cases) for x in (method, reference, upper))
            low, high, finite = bootstrap_interval([gm, gr, gu], gap_closed, level, replicates, rng_seed)
            result.gap_closed = float(gap_closed(gm, gr, gu))
            result.gap_closed_ci = (low, high)
            result.gap_closed_defined_share = finite / replicates
            result.gap_closed_seeds = gap_seeds
    return result


def gap_seeds_note(comparison: PairedComparison) -> str:
    """' (seed 12345 only)' when the gap closed rests on fewer seeds than the difference, else ''."""
    gap = comparison.gap_closed_seeds
    if gap is None or list(gap) == list(comparison.seeds):
        return ''
    return f' (seed{"s" if len(gap) != 1 else ""} {", ".join(gap)} only)'


def describe(name: str, reference_name: str, comparison: PairedComparison, unit: str = 'Dice points',
             scale: float = 100.0) -> str:
    """One sentence saying whether the data separate ``name`` from ``reference_name``."""
    low, high = (v * scale for v in comparison.difference_ci)
    d = comparison.difference * scale
    seeds = len(comparison.seeds)
    basis = (f'{comparison.pairs} (case, seed) pairs, {len(comparison.cases)} cases x {seeds} seed'
             f'{"s" if seeds != 1 else ""}')
    if comparison.separated:
        verdict = 'better than' if d > 0 else 'worse than'
        text = (f'{name} is {verdict} {reference_name} by {d:+.1f} {unit} (95 % CI {low:+.1f} to {high:+.1f}, '
                f'{basis}; better on {comparison.wins}/{comparison.pairs}): the interval excludes zero.')
    else:
        text = (f'{name} vs {reference_name}: {d:+.1f} {unit} (95 % CI {low:+.1f} to {high:+.1f}, {basis}; better '
                f'on {comparison.wins}/{comparison.pairs}): the data cannot separate them.')
    if seeds == 1:
        text += ' One seed only: the interval covers case-to-case, not seed-to-seed, variation.'
    return text
