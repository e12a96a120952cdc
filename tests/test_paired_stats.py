"""benchmarks/paired_stats.py against hand-computed values, a coverage check on data with a known answer, and
degenerate inputs (one seed, one case, identical methods)."""
import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))

import paired_stats as ps  # noqa: E402


def scores(values_by_seed):
    """{seed: [v_case0, v_case1, ...]} -> {seed: {case: v}}"""
    return {str(s): {f'case{i}': float(v) for i, v in enumerate(vals)} for s, vals in values_by_seed.items()}


def test_identical_methods_give_zero_difference_and_no_separation():
    a = scores({1: [0.6, 0.7, 0.8], 2: [0.5, 0.9, 0.65]})
    c = ps.compare(a, a, replicates=500)
    assert c.difference == 0.0 and c.difference_ci == (0.0, 0.0)
    assert c.wins == 0 and c.ties == 6 and c.pairs == 6
    assert not c.separated
    assert 'cannot separate' in ps.describe('X', 'Y', c)


def test_interval_on_a_hand_built_example():
    # One seed, differences (0, 1): a bootstrap mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5 % and 97.5 % quantiles are exactly 0 and 1.
    ref = scores({7: [0.2, 0.3]})
    method = scores({7: [0.2, 1.3]})
    c = ps.compare(method, ref, replicates=4000)
    assert c.difference == pytest.approx(0.5)
    assert c.difference_ci == (pytest.approx(0.0), pytest.approx(1.0))
    assert c.wins == 1 and c.ties == 1
    assert not c.separated


def test_constant_difference_has_a_point_interval_and_is_separated():
    ref = scores({1: [0.5, 0.6, 0.7], 2: [0.4, 0.8, 0.6]})
    method = {s: {k: v + 0.03 for k, v in cases.items()} for s, cases in ref.items()}
    c = ps.compare(method, ref, replicates=300)
    assert c.difference == pytest.approx(0.03)
    assert c.difference_ci[0] == pytest.approx(0.03) and c.difference_ci[1] == pytest.approx(0.03)
    assert c.separated and c.wins == 6
    assert 'better than' in ps.describe('M', 'R', c) and '+3.0' in ps.describe('M', 'R', c)


def test_pairing_uses_same_case_and_seed():
    # Large case-to-case spread, tiny but consistent gain: paired, the interval excludes zero.
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.9, size=(2, 12))
    ref = {str(s): {f'c{i}': base[s, i] for i in range(12)} for s in range(2)}
    method = {str(s): {f'c{i}': base[s, i] + 0.01 + 0.002 * rng.standard_normal() for i in range(12)}
              for s in range(2)}
    c = ps.compare(method, ref, replicates=1000)
    assert c.separated and c.difference_ci[0] > 0
    # Shuffling the method's cases breaks the pairing: the same values no longer separate.
    shuffled = {s: dict(zip(v.keys(), np.roll(list(v.values()), 5))) for s, v in method.items()}
    assert not ps.compare(shuffled, ref, replicates=1000).separated


def test_interval_coverage_on_data_with_a_known_mean():
    # Differences drawn from N(0.02, 0.05^2) on 30 cases, one seed: the 95 % interval should cover 0.02 in about
    # 95 % of experiments (percentile bootstrap, slightly fewer at this n).
    rng = np.random.default_rng(11)
    covered, experiments = 0, 500
    for _ in range(experiments):
        ref_vals = rng.uniform(0.5, 0.9, 30)
        diff = 0.02 + 0.05 * rng.standard_normal(30)
        c = ps.compare(scores({0: ref_vals + diff}), scores({0: ref_vals}), replicates=1000,
                       rng_seed=int(rng.integers(1 << 30)))
        covered += c.difference_ci[0] <= 0.02 <= c.difference_ci[1]
    assert 0.90 <= covered / experiments <= 0.98


def test_gap_closed_hand_values_and_undefined_gap():
    a = scores({1: [0.6, 0.6]})
    b = scores({1: [0.8, 0.8]})
    m = scores({1: [0.7, 0.7]})
    c = ps.compare(m, a, upper=b, replicates=200)
    assert c.gap_closed == pytest.approx(0.5)
    assert c.gap_closed_ci == (pytest.approx(0.5), pytest.approx(0.5))
    assert c.gap_closed_defined_share == 1.0
    worse = ps.compare(scores({1: [0.55, 0.55]}), a, upper=b, replicates=200)
    assert worse.gap_closed == pytest.approx(-0.25)
    # upper == lower: no gap to close
    undefined = ps.compare(m, a, upper=a, replicates=100)
    assert math.isnan(undefined.gap_closed) and undefined.gap_closed_defined_share == 0.0


def test_one_case_and_one_seed():
    c = ps.compare(scores({1: [0.9]}), scores({1: [0.8]}), replicates=50)
    assert c.difference == pytest.approx(0.1) and c.difference_ci == (pytest.approx(0.1), pytest.approx(0.1))
    assert 'One seed only' in ps.describe('M', 'R', c)


def test_only_shared_pairs_are_compared():
    ref = scores({1: [0.5, 0.6], 2: [0.5, 0.6]})
    method = {'1': {'case0': 0.7, 'case1': 0.6, 'extra': 0.1}}     # seed 2 missing, one extra case
    c = ps.compare(method, ref, replicates=50)
    assert c.seeds == ['1'] and c.cases == ['case0', 'case1'] and c.pairs == 2
    with pytest.raises(ValueError, match='no \\(seed, case\\) pair'):
        ps.compare({'3': {'case0': 1.0}}, ref)


def test_summary_over_seeds():
    s = ps.summarise_over_seeds(scores({1: [0.6, 0.8], 2: [0.5, 0.7]}))
    assert s.per_seed == {'1': pytest.approx(0.7), '2': pytest.approx(0.6)}
    assert s.mean == pytest.approx(0.65) and s.std == pytest.approx(math.sqrt(0.005))
    one = ps.summarise_over_seeds(scores({1: [0.6, 0.8]}))
    assert one.mean == pytest.approx(0.7) and math.isnan(one.std)


def test_difference_keeps_seeds_that_the_upper_reference_lacks():
    # supervised_b measured on seed 1 only: the difference to supervised_a still pairs both seeds,
    # the gap closed uses seed 1 alone.
    a = scores({1: [0.6, 0.6], 2: [0.5, 0.7]})
    m = scores({1: [0.7, 0.7], 2: [0.8, 0.8]})
    b = scores({1: [0.8, 0.8]})
    c = ps.compare(m, a, upper=b, replicates=200)
    assert c.seeds == ['1', '2'] and c.pairs == 4
    assert c.difference == pytest.approx((0.1 + 0.1 + 0.3 + 0.1) / 4)
    assert c.wins == 4
    assert c.gap_closed_seeds == ['1']
    assert c.gap_closed == pytest.approx(0.5)
    # without an upper reference for any shared seed there is no gap closed, but the difference stands
    none = ps.compare(m, a, upper=scores({3: [0.9, 0.9]}), replicates=50)
    assert none.gap_closed is None and none.pairs == 4
    assert ps.gap_seeds_note(c) == ' (seed 1 only)'
    assert ps.gap_seeds_note(ps.compare(m, a, upper=scores({1: [0.8, 0.8], 2: [0.9, 0.9]}), replicates=50)) == ''
