"""What the gain depends on: the schedule and weight study of the LA accuracy protocol (docs/benchmarks.md,
section ``accuracy_la:study``, figure ``docs/figures/accuracy_la_study.png``).

Built from the per-seed results JSONs that ``accuracy_la.py`` writes, with the paired statistics of
``paired_stats`` (same test case, same seed):

- **Schedule.** The long-schedule protocol (``accuracy_la_labeled2_it1000_test12*.json``, run with
  ``--snapshot-epochs``): each method's test Dice after 300, 500, 700 and 1000 iterations of one run (its learning
  curve; the last step's paired change says whether the model still improved), its difference to supervised_a at
  the end, and the same method on the 300-iteration schedule for comparison (a 300-iteration schedule decays the
  learning rate to zero at 300; a snapshot at 300 of the long run has not).
- **Weights.** One factor at a time on the 300-iteration protocol (``accuracy_la_labeled2_it300_test12*.json``):
  each variant of ``nnunetv2_semiseg/trainers/study_variants.py`` against supervised_a and against its default.

    python benchmarks/study_report.py            # rewrite the section and the figure from the JSONs
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import accuracy_report  # noqa: E402
import paired_stats as ps  # noqa: E402

SECTION_KEY = 'accuracy_la:study'
SHORT_BASE = 'accuracy_la_labeled2_it300_test12'
LONG_BASE = 'accuracy_la_labeled2_it1000_test12'
DEFAULT_SEED = 12345
BASELINE, UPPER = accuracy_report.BASELINE, accuracy_report.UPPER
# (variant, its default trainer, the one factor it changes)
WEIGHT_SETTINGS = [
    ('nnUNetTrainerMeanTeacher_consistency1', 'nnUNetTrainerMeanTeacher', 'consistency weight 1.0 (default 0.1)'),
    ('nnUNetTrainerMeanTeacher_ramp10', 'nnUNetTrainerMeanTeacher', 'ramp-up over 10 % of training (default 40 %)'),
    ('nnUNetTrainerSSNet_unsupervised01', 'nnUNetTrainerSSNet', 'unsupervised weight 0.1 (default 1.0)'),
]


def learning_curves(data: Dict) -> Dict[str, Dict[int, Dict[str, Dict[str, float]]]]:
    """{method: {iterations: {seed: {case: dice}}}} from each row's snapshots plus its final checkpoint."""
    curves = {}
    for method, by_seed in data['rows'].items():
        for seed, row in by_seed.items():
            if 'per_case_dice' not in row:
                continue
            schedule = row.get('schedule') or [None, None]
            total = schedule[0] * schedule[1] if schedule[0] and schedule[1] else None
            points = {int(k): v['per_case_dice'] for k, v in (row.get('snapshots') or {}).items()}
            if total is not None:
                points[total] = row['per_case_dice']
            for iterations, dice in points.items():
                curves.setdefault(method, {}).setdefault(iterations, {})[seed] = dict(dice)
    return curves


def mean_dice(scores: Dict[str, Dict[str, float]]) -> float:
    """Mean over seeds of the mean test Dice (each seed's cases averaged first)."""
    per_seed = [sum(c.values()) / len(c) for c in scores.values() if c]
    return sum(per_seed) / len(per_seed) if per_seed else float('nan')


def _pct(value: Optional[float]) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value * 100:.2f}'


def _diff(c: Optional[ps.PairedComparison]) -> str:
    if c is None:
        return 'n/a'
    low, high = c.difference_ci
    return f'{c.difference * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]'


def _compare(method: Optional[Dict], reference: Optional[Dict], upper: Optional[Dict] = None,
             replicates: int = ps.DEFAULT_REPLICATES) -> Optional[ps.PairedComparison]:
    if not method or not reference:
        return None
    try:
        return ps.compare(method, reference, upper=upper, replicates=replicates)
    except ValueError:  # no shared (case, seed) pair
        return None


def _seed_values(scores: Optional[Dict[str, Dict[str, float]]]) -> str:
    """Mean test Dice per seed, the default seed first (as the tables of accuracy_la.py)."""
    if not scores:
        return 'n/a'
    order = sorted(scores, key=lambda seed: (seed != str(DEFAULT_SEED), int(seed)))
    return ', '.join(f'{s}: {sum(scores[s].values()) / len(scores[s]) * 100:.2f}' for s in order)


def short_dice(short: Dict, method: str, seeds) -> Optional[float]:
    """The method's mean Dice on the 300-iteration schedule over the seeds of its long run (same seeds only)."""
    scores = {seed: c for seed, c in short['dice'].get(method, {}).items() if seed in seeds}
    return mean_dice(scores) if scores else None


def schedule_part(long: Dict, short: Dict, replicates: int) -> Dict:
    curves = learning_curves(long)
    methods = accuracy_report.ordered_methods(curves)
    points = sorted({i for m in methods for i in curves[m]})
    final = max(points) if points else None
    rows = []
    for m in methods:
        curve = curves[m]
        steps = sorted(curve)
        last_step = _compare(curve[steps[-1]], curve[steps[-2]], replicates=replicates) if len(steps) > 1 else None
        vs_a = None if m == BASELINE else _compare(
            curve.get(final), curves.get(BASELINE, {}).get(final),
            None if m == UPPER else curves.get(UPPER, {}).get(final), replicates)
        rows.append({'method': m, 'curve': {i: mean_dice(curve[i]) for i in steps}, 'seeds': sorted(curve[steps[-1]]),
                     'last_step': last_step, 'last_step_from': steps[-2] if len(steps) > 1 else None,
                     'vs_a': vs_a, 'short': short_dice(short, m, curve[steps[-1]])})
    return {'points': points, 'final': final, 'rows': rows}


def weight_part(short: Dict, replicates: int) -> List[Dict]:
    dice = short['dice']
    a, b = dice.get(BASELINE), dice.get(UPPER)
    rows = []
    defaults = []
    for variant, default, factor in WEIGHT_SETTINGS:
        if default not in defaults:
            defaults.append(default)
            rows.append({'method': default, 'factor': 'default', 'scores': dice.get(default),
                         'vs_a': _compare(dice.get(default), a, b, replicates), 'vs_default': None})
        rows.append({'method': variant, 'factor': factor, 'scores': dice.get(variant),
                     'vs_a': _compare(dice.get(variant), a, b, replicates),
                     'vs_default': _compare(dice.get(variant), dice.get(default), replicates=replicates),
                     'default': default})
    return rows


def render_markdown(schedule: Dict, weights: List[Dict], long_files: List[str], short_files: List[str],
                    figure_rel: Optional[str], notes: str) -> str:
    lines = ['Does the gain survive a longer schedule, and how much does it depend on '
             'the weights? A sensitivity study, not a search: no default was changed because of it. Intervals: 95 % '
             'paired bootstrap over test cases and seeds (`benchmarks/paired_stats.py`); with one seed they cover '
             'case-to-case variation only. Generated by `benchmarks/study_report.py`.', '']
    if figure_rel:
        lines += [f'![learning curves and weight settings]({figure_rel})', '']
    lines += ['**Schedule** (1000 iterations = 50 epochs x 20, the 300-iteration protocol\'s epoch length; the test '
              'cases predicted with the checkpoints after 300, 500 and 700 iterations of the same run, '
              '`--snapshot-epochs 15,25,35`). Files: ' + (', '.join(f'`{f}`' for f in long_files) or 'none') + '. '
              'A run: `python benchmarks/accuracy_la.py --method <method> --epochs 50 --iterations-per-epoch 20 '
              '--val-iterations 2 --snapshot-epochs 15,25,35 [--seed N]`; on a GPU, `python benchmarks/gpu_suite.py '
              '--device cuda --part 2` runs the same schedule and then the weight study.', '']
    if schedule['rows']:
        points = schedule['points']
        lines += ['| method | seeds | ' + ' | '.join(f'Dice % at {p}' for p in points) +
                  ' | last step, Dice points [CI] | vs supervised_a at the end [CI] | pairs better | gap closed | '
                  '300-iteration schedule, same seeds |',
                  '|---|---|' + '---|' * len(points) + '---|---|---|---|---|']
        for r in schedule['rows']:
            c = r['vs_a']
            gap = 'n/a'
            if c is not None and c.gap_closed is not None and math.isfinite(c.gap_closed):
                low, high = c.gap_closed_ci
                gap = f'{c.gap_closed * 100:.0f} %' + (f' [{low * 100:.0f}, {high * 100:.0f} %]'
                                                       if math.isfinite(low) else '') + ps.gap_seeds_note(c)
            step = (f'{r["last_step_from"]}->{max(r["curve"])}: {_diff(r["last_step"])}'
                    if r['last_step'] is not None else 'n/a')
            lines.append(f'| {r["method"]} | {", ".join(r["seeds"])} | ' +
                         ' | '.join(_pct(r['curve'].get(p)) for p in points) +
                         f' | {step} | {"ref." if r["method"] == BASELINE else _diff(c)} | '
                         f'{f"{c.wins}/{c.pairs}" if c else "n/a"} | {gap} | {_pct(r["short"])} |')
    else:
        lines.append('No long-schedule results yet.')
    lines += ['', '**Weights** (300 iterations, one factor at a time, mean test Dice per seed; the variants are '
              'in `nnunetv2_semiseg/trainers/study_variants.py`, each run as `python benchmarks/accuracy_la.py '
              '--method <variant> --epochs 15 --iterations-per-epoch 20 --val-iterations 2 --seed N`). Files: ' +
              (', '.join(f'`{f}`' for f in short_files) or 'none') + '.', '',
              '| trainer | factor | Dice % per seed | vs supervised_a [CI] | pairs better | gap closed | '
              'vs its default [CI] | pairs better than the default |',
              '|---|---|---|---|---|---|---|---|']
    for r in weights:
        c, d = r['vs_a'], r['vs_default']
        gap = 'n/a'
        if c is not None and c.gap_closed is not None and math.isfinite(c.gap_closed):
            gap = f'{c.gap_closed * 100:.0f} %' + ps.gap_seeds_note(c)
        lines.append(f'| {r["method"]} | {r["factor"]} | {_seed_values(r["scores"])} | {_diff(c)} | '
                     f'{f"{c.wins}/{c.pairs}" if c else "n/a"} | {gap} | '
                     f'{"-" if r["factor"] == "default" else _diff(d)} | '
                     f'{f"{d.wins}/{d.pairs}" if d else "-"} |')
    sentences = [ps.describe(r['method'], r['default'], r['vs_default']) for r in weights if r['vs_default']]
    sentences += [ps.describe(f'{r["method"]} after {max(r["curve"])} iterations', BASELINE, r['vs_a'])
                  for r in schedule['rows'] if r['vs_a'] is not None]
    if sentences:
        lines += [''] + [f'- {s}' for s in sentences]
    if notes:
        lines += ['', notes.strip()]
    return '\n'.join(lines)


def draw_figure(schedule: Dict, weights: List[Dict], path: str):
    """Left: mean test Dice against iterations for each long-schedule method (hollow markers: the 300-iteration
    schedule). Right: difference to supervised_a with its interval for every weight setting. Returns the Figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5), gridspec_kw={'width_ratios': [1.0, 1.1]})
    ax = axes[0]
    for i, r in enumerate(schedule['rows']):
        colour = plt.cm.tab10(i % 10)
        xs = sorted(r['curve'])
        ax.plot(xs, [r['curve'][x] * 100 for x in xs], 'o-', color=colour, label=r['method'])
        if r['short'] is not None:
            ax.scatter([300], [r['short'] * 100], facecolors='none', edgecolors=colour, s=70, zorder=3)
    ax.scatter([], [], facecolors='none', edgecolors='grey', s=70, label='300-iteration schedule')
    ax.set_xlabel('training iterations')
    ax.set_ylabel('mean test Dice % (12 cases)')
    ax.set_title('learning curves on the 1000-iteration schedule')
    ax.legend(loc='best', fontsize=8, framealpha=0.6)
    ax = axes[1]
    shown = [r for r in weights if r['vs_a'] is not None]
    for y, r in enumerate(shown):
        c = r['vs_a']
        low, high = c.difference_ci
        ax.errorbar([c.difference * 100], [y], xerr=[[(c.difference - low) * 100], [(high - c.difference) * 100]],
                    fmt='o' if r['factor'] == 'default' else 's', capsize=4,
                    color='black' if r['factor'] == 'default' else 'tab:orange')
    ax.axvline(0, color='grey', lw=0.8)
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels([r['method'] for r in shown])
    ax.invert_yaxis()
    ax.set_xlabel('Dice % minus supervised_a (same case, same seed), mean and 95 % CI')
    ax.set_title('weight settings, 300 iterations (black: default)')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return fig


def update(results_dir: str, markdown: str, figure: Optional[str], notes: str = '',
           replicates: int = ps.DEFAULT_REPLICATES, short_base: str = SHORT_BASE, long_base: str = LONG_BASE) -> Dict:
    from iteration_cost import replace_section
    long = accuracy_report.collect(results_dir, long_base, DEFAULT_SEED)
    short = accuracy_report.collect(results_dir, short_base, DEFAULT_SEED)
    schedule = schedule_part(long, short, replicates)
    weights = weight_part(short, replicates)
    figure_rel = None
    result = {'schedule': schedule, 'weights': weights}
    if figure:
        result['figure'] = draw_figure(schedule, weights, figure)
        figure_rel = os.path.relpath(figure, os.path.dirname(os.path.abspath(markdown)))
    replace_section(markdown, SECTION_KEY, render_markdown(schedule, weights, long['files'], short['files'],
                                                           figure_rel, notes))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--results-dir', default=os.path.join(HERE, 'results'))
    p.add_argument('--markdown', default=os.path.join(REPO, 'docs', 'benchmarks.md'))
    p.add_argument('--figure', default=os.path.join(REPO, 'docs', 'figures', 'accuracy_la_study.png'))
    p.add_argument('--notes', default=None, help='a markdown file appended to the section (the reading of it)')
    args = p.parse_args(argv)
    notes = open(args.notes).read() if args.notes else ''
    update(args.results_dir, args.markdown, args.figure, notes)
    print(f'wrote section {SECTION_KEY} of {args.markdown} and {args.figure}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
