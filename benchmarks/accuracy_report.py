"""Across-seed summary of the LA accuracy benchmark: paired statistics (``paired_stats``), a markdown section and a
figure, built from the per-seed results JSONs that ``accuracy_la.py`` writes.

One protocol = one results "base" name, e.g. ``accuracy_la_labeled2_it300_test12``; its seeds are the files
``<base>.json`` (the default seed) and ``<base>_seed<N>.json``. A method enters the summary with every seed it has;
each comparison uses the (case, seed) pairs that both sides have.

    python benchmarks/accuracy_report.py --base accuracy_la_labeled2_it300_test12     # rewrite section + figure
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import paired_stats as ps  # noqa: E402

BASELINE = 'supervised_a'
UPPER = 'supervised_b'
SEMI_REFERENCE = 'nnUNetTrainerMeanTeacher'   # the classic semi-supervised baseline: other methods are also compared to it
METHOD_ORDER = ['supervised_a', 'supervised_b', 'selftrain', 'nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet']


def run_key(draw: int, seed: str) -> str:
    """The key of one run in the summary: the seed for label draw 0 (as before draws existed), 'draw<K>:<seed>'
    otherwise. Paired statistics pair runs with the same key, so pairs are (draw, seed, test case)."""
    return str(seed) if not draw else f'draw{draw}:{seed}'


def run_order(key: str):
    """Sort key of run keys: draw 0 first, then by draw, then by seed."""
    draw, _, seed = key.rpartition(':')
    return (int(draw[len('draw'):]) if draw else 0, int(seed))


def draw_of(key: str) -> int:
    """The label draw of a run key ('12345' -> 0, 'draw1:12345' -> 1)."""
    draw, _, _ = key.rpartition(':')
    return int(draw[len('draw'):]) if draw else 0


def runs_of_draws(scores: Dict[str, Dict[str, Dict]], draws) -> Dict[str, Dict[str, Dict]]:
    """``{method: {run: ...}}`` restricted to the runs of the given label draws (methods without such runs dropped)."""
    out = {}
    for method, runs in scores.items():
        kept = {k: v for k, v in runs.items() if draw_of(k) in draws}
        if kept:
            out[method] = kept
    return out


def collect(results_dir: str, base: str, default_seed: int) -> Dict:
    """{'dice': {method: {run: {case: v}}}, 'hd95': {...}, 'rows': {method: {run: row}}, 'files': [...]}; a run
    is a seed of label draw 0 ('12345') or a (draw, seed) pair ('draw1:12345', files ``<base>_draw1[_seed<N>]``)."""
    pattern = re.compile(re.escape(base) + r'(?:_draw(\d+))?(?:_seed(\d+))?\.json$')
    out = {'dice': {}, 'hd95': {}, 'rows': {}, 'files': []}
    for path in sorted(glob.glob(os.path.join(results_dir, base + '*.json'))):
        match = pattern.fullmatch(os.path.basename(path))
        if not match:
            continue
        seed = run_key(int(match.group(1) or 0), match.group(2) or str(default_seed))
        with open(path) as f:
            results = json.load(f)
        out['files'].append(os.path.relpath(path, REPO))
        for method, row in results.get('methods', {}).items():
            if 'per_case_dice' not in row:
                continue
            out['dice'].setdefault(method, {})[seed] = dict(row['per_case_dice'])
            if 'per_case_hd95_voxel' in row:
                out['hd95'].setdefault(method, {})[seed] = dict(row['per_case_hd95_voxel'])
            out['rows'].setdefault(method, {})[seed] = row
    return out


def ordered_methods(methods) -> List[str]:
    return [m for m in METHOD_ORDER if m in methods] + sorted(m for m in methods if m not in METHOD_ORDER)


def comparisons(data: Dict, replicates: int = ps.DEFAULT_REPLICATES) -> Dict[str, Dict[str, ps.PairedComparison]]:
    """{method: {'vs_a': ..., 'vs_mt': ...}} for every method that shares pairs with the references."""
    dice = data['dice']
    result = {}
    for method in ordered_methods(dice):
        entry = {}
        if method != BASELINE and BASELINE in dice:
            try:
                entry['vs_a'] = ps.compare(dice[method], dice[BASELINE],
                                           upper=dice.get(UPPER) if method != UPPER else None, replicates=replicates)
            except ValueError:
                pass
        if method not in (BASELINE, UPPER, SEMI_REFERENCE) and SEMI_REFERENCE in dice:
            try:
                entry['vs_mt'] = ps.compare(dice[method], dice[SEMI_REFERENCE], replicates=replicates)
            except ValueError:
                pass
        result[method] = entry
    return result


def _pct(v, digits=1) -> str:
    return 'n/a' if v is None or not math.isfinite(v) else f'{v * 100:.{digits}f}'


def _pm(summary: ps.SeedSummary, scale=100.0, digits=1) -> str:
    if not math.isfinite(summary.mean):
        return 'n/a'
    sd = f' ± {summary.std * scale:.{digits}f}' if math.isfinite(summary.std) else ' (1 seed)'
    return f'{summary.mean * scale:.{digits}f}{sd}'


def draw0(data: Dict) -> Dict:
    """The data of label draw 0 only: the main table's protocol (the train list's first labeled cases)."""
    return {'dice': runs_of_draws(data['dice'], {0}), 'hd95': runs_of_draws(data['hd95'], {0}),
            'rows': runs_of_draws(data['rows'], {0}), 'files': data['files']}


def draw_table(data: Dict, replicates: int = ps.DEFAULT_REPLICATES) -> List[str]:
    """Markdown lines of the across-draws table: for every method with runs on a label draw other than 0, per draw
    the method's and supervised_a's mean Dice and their paired difference (interval over that draw's cases and
    seeds), then the difference over every (draw, seed, case) pair, whose bootstrap resamples the runs (draws and
    seeds) as well as the cases. Empty when no run has another draw."""
    dice = data['dice']
    draws = sorted({draw_of(k) for runs in dice.values() for k in runs})
    if draws == [0] or BASELINE not in dice:
        return []
    methods = [m for m in ordered_methods(dice) if m != BASELINE and any(draw_of(k) for k in dice[m])]
    if not methods:
        return []
    lines = ['**Across label draws** (draw K = the K-th block of consecutive training-list entries as the labeled '
             'cases, the rest unlabeled, the same test cases):', '',
             '| method | ' + ' | '.join(f'draw {d}: Dice % method / supervised_a, difference [95 % CI]'
                                       for d in draws) + ' | draws better | all draws: difference [95 % CI], pairs |',
             '|---|' + '---|' * len(draws) + '---|---|']
    base_means = {}
    for d in draws:
        runs = {k: v for k, v in dice[BASELINE].items() if draw_of(k) == d}
        base_means[d] = ps.summarise_over_seeds(runs).mean if runs else float('nan')
    for method in methods:
        cells, better, measured = [], 0, 0
        for d in draws:
            mine = {k: v for k, v in dice[method].items() if draw_of(k) == d}
            ref = {k: v for k, v in dice[BASELINE].items() if draw_of(k) == d}
            try:
                c = ps.compare(mine, ref, replicates=replicates)
            except ValueError:
                cells.append('-')
                continue
            measured += 1
            better += c.difference > 0
            low, high = c.difference_ci
            cells.append(f'{ps.summarise_over_seeds(mine).mean * 100:.1f} / {base_means[d] * 100:.1f}, '
                         f'{c.difference * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]')
        try:
            c = ps.compare(dice[method], dice[BASELINE], replicates=replicates)
            low, high = c.difference_ci
            overall = f'{c.difference * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}], {c.pairs}'
        except ValueError:
            overall = 'n/a'
        lines.append(f'| {method} | ' + ' | '.join(cells) + f' | {better}/{measured} | {overall} |')
    lines += ['', 'Per draw: paired over that draw\'s (case, seed) pairs. All draws: paired over (draw, seed, case); '
                  'the bootstrap draws runs (label draw x seed) and cases with replacement, so the interval includes '
                  'the draw-to-draw variation. supervised_a is trained on the same labeled cases as the method in '
                  'each draw.', '']
    return lines


def render_markdown(data: Dict, comps: Dict, title: str, description: str, figure_rel: Optional[str],
                    draw_lines: Optional[List[str]] = None) -> str:
    dice, hd95 = data['dice'], data['hd95']
    lines = [f'### {title}', '', description, '',
             '| method | seeds | Dice % (mean ± sd over seeds) | 95HD vox (mean ± sd) | Dice vs supervised_a, '
             'points [95 % CI] | better than supervised_a | gap closed [95 % CI] |',
             '|---|---|---|---|---|---|---|']
    for method in ordered_methods(dice):
        seeds = sorted(dice[method], key=run_order)
        d_sum = ps.summarise_over_seeds(dice[method])
        h_sum = ps.summarise_over_seeds(hd95[method]) if method in hd95 else None
        c = comps.get(method, {}).get('vs_a')
        if method == BASELINE:
            diff, wins, gap = '0 (ref.)', '-', '0 % (ref.)'
        elif c is None:
            diff, wins, gap = 'n/a', 'n/a', 'n/a'
        else:
            low, high = c.difference_ci
            diff = f'{c.difference * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]'
            wins = f'{c.wins}/{c.pairs}'
            if method == UPPER:
                gap = '100 % (ref.)'
            elif c.gap_closed is not None and math.isfinite(c.gap_closed):
                glow, ghigh = c.gap_closed_ci
                gap = f'{c.gap_closed * 100:.0f} % [{_pct(glow, 0)}, {_pct(ghigh, 0)} %]' + ps.gap_seeds_note(c)
            else:
                gap = 'n/a'
        h_text = 'n/a' if h_sum is None else (f'{h_sum.mean:.2f}' + (f' ± {h_sum.std:.2f}' if math.isfinite(h_sum.std)
                                                                      else ' (1 seed)'))
        lines.append(f'| {method} | {", ".join(seeds)} | {_pm(d_sum)} | {h_text} | {diff} | {wins} | {gap} |')
    lines += ['', 'Dice vs supervised_a: mean over (test case, seed) pairs of the paired difference (same test case, '
                  'same seed); 95 % CI: percentile bootstrap over cases and seeds (10,000 replicates, '
                  '`benchmarks/paired_stats.py`). Gap closed = (Dice - Dice supervised_a) / (Dice supervised_b - '
                  'Dice supervised_a), with the same bootstrap. "better than supervised_a" = pairs with a higher '
                  'Dice.', '', '**What the data can and cannot separate:**', '']
    for method in ordered_methods(dice):
        for key, ref in (('vs_a', BASELINE), ('vs_mt', SEMI_REFERENCE)):
            c = comps.get(method, {}).get(key)
            if c is not None:
                lines.append(f'- {ps.describe(method, ref, c)}')
    if draw_lines:
        lines += [''] + draw_lines[:-1]
    if figure_rel:
        lines += ['', f'![per-case test Dice, paired differences and gap closed]({figure_rel})']
    lines += ['', 'Results JSONs: ' + ', '.join(f'`{f}`' for f in data['files']) + '.']
    return '\n'.join(lines)


def draw_figure(data: Dict, comps: Dict, path: str, title: str):
    """Three panels: per-case Dice joined across methods for each (case, seed); paired difference to supervised_a
    per (case, seed) with the mean and its interval; gap closed with its interval. Returns the Figure."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    dice = data['dice']
    methods = ordered_methods(dice)
    seeds = sorted({s for m in methods for s in dice[m]}, key=run_order)
    colours = {s: plt.cm.tab10(i % 10) for i, s in enumerate(seeds)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), gridspec_kw={'width_ratios': [1.3, 1.1, 0.9]})

    ax = axes[0]
    x = {m: i for i, m in enumerate(methods)}
    for seed in seeds:
        cases = sorted({c for m in methods if seed in dice[m] for c in dice[m][seed]})
        for case in cases:
            pts = [(x[m], dice[m][seed][case] * 100) for m in methods if seed in dice[m] and case in dice[m][seed]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], '-', color=colours[seed], alpha=0.25, lw=0.8)
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colours[seed], s=12, alpha=0.8)
    for seed in seeds:
        draw = draw_of(seed)
        ax.scatter([], [], color=colours[seed],
                   label=f'seed {seed}' if not draw else f'label draw {draw}, seed {seed.rpartition(":")[2]}')
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=30, ha='right')
    ax.set_ylabel('test Dice % (one line = one test case, one seed)')
    ax.set_title('per-case test Dice')
    ax.legend(loc='best', fontsize=8, framealpha=0.6)

    ax = axes[1]
    others = [m for m in methods if m != BASELINE and comps.get(m, {}).get('vs_a') is not None]
    for i, m in enumerate(others):
        c = comps[m]['vs_a']
        for seed in c.seeds:
            diffs = [(dice[m][seed][case] - dice[BASELINE][seed][case]) * 100 for case in c.cases]
            ax.scatter([i + 0.12 * (seeds.index(seed) - (len(seeds) - 1) / 2)] * len(diffs), diffs,
                       color=colours[seed], s=12, alpha=0.7)
        low, high = c.difference_ci
        ax.errorbar([i + 0.3], [c.difference * 100], yerr=[[(c.difference - low) * 100], [(high - c.difference) * 100]],
                    fmt='D', color='black', capsize=4, label='mean, 95 % CI' if i == 0 else None)
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_xticks(range(len(others)))
    ax.set_xticklabels(others, rotation=30, ha='right')
    ax.set_ylabel('Dice % minus supervised_a (same case, same seed)')
    ax.set_title('paired difference to supervised_a')
    if others:
        ax.legend(loc='best', fontsize=8, framealpha=0.6)

    ax = axes[2]
    gapped = [m for m in others if m != UPPER and comps[m]['vs_a'].gap_closed is not None
              and math.isfinite(comps[m]['vs_a'].gap_closed)]
    for i, m in enumerate(gapped):
        c = comps[m]['vs_a']
        low, high = c.gap_closed_ci
        yerr = [[max(0.0, (c.gap_closed - low) * 100)], [max(0.0, (high - c.gap_closed) * 100)]] \
            if math.isfinite(low) else None
        ax.errorbar([i], [c.gap_closed * 100], yerr=yerr, fmt='o', color='tab:blue', capsize=4)
    ax.axhline(0, color='grey', lw=0.8)
    ax.axhline(100, color='grey', lw=0.8, ls='--')
    ax.set_xticks(range(len(gapped)))
    ax.set_xticklabels(gapped, rotation=30, ha='right')
    ax.set_ylabel('gap closed % (0 = supervised_a, 100 = supervised_b)')
    ax.set_title('share of the label gap closed, 95 % CI')
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)
    return fig


def update(results_dir: str, base: str, default_seed: int, markdown: str, section_key: str, figure: Optional[str],
           title: str, description: str, replicates: int = ps.DEFAULT_REPLICATES) -> Dict:
    from iteration_cost import replace_section
    everything = collect(results_dir, base, default_seed)
    if not everything['dice']:
        return everything
    # The main table is label draw 0 (the protocol every earlier row used); other draws get their own table.
    data = draw0(everything)
    comps = comparisons(data, replicates)
    figure_rel = None
    if figure:
        data['figure'] = draw_figure(everything, comparisons(everything, replicates), figure, title)
        figure_rel = os.path.relpath(figure, os.path.dirname(os.path.abspath(markdown)))
    replace_section(markdown, section_key, render_markdown(data, comps, title, description, figure_rel,
                                                           draw_table(everything, replicates)))
    data['comparisons'] = comps
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--base', required=True, help='results base name, e.g. accuracy_la_labeled2_it300_test12')
    p.add_argument('--results-dir', default=os.path.join(HERE, 'results'))
    p.add_argument('--default-seed', type=int, default=12345)
    p.add_argument('--markdown', default=os.path.join(REPO, 'docs', 'benchmarks.md'))
    p.add_argument('--figure', default=None, help='PNG to write (default: docs/figures/<base minus accuracy_>.png)')
    p.add_argument('--title', default=None)
    args = p.parse_args(argv)
    figure = args.figure or os.path.join(REPO, 'docs', 'figures', args.base.replace('accuracy_la_', 'accuracy_la_')
                                         + '.png')
    data = update(args.results_dir, args.base, args.default_seed, args.markdown, f'summary:{args.base}', figure,
                  args.title or f'Across seeds: {args.base}', '')
    if not data['dice']:
        print(f'no results for {args.base} in {args.results_dir}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
