"""The accuracy benchmark's tables: per-seed rendering and the across-seed summary with its figure.

The smoke run of ``benchmarks/accuracy_la.py --smoke`` on real LA cases is part of the GPU suite's smoke test
(tests/test_gpu_suite_smoke.py), which runs it as its accuracy step.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'benchmarks', 'accuracy_la.py')
DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'la_h5_uamt_subset'))
METHODS = ['supervised_a', 'nnUNetTrainerMeanTeacher']


def _row(method, trainer, dice):
    metrics = {'dice': dice, 'jaccard': dice / (2 - dice), 'hd95_voxel': 4.0, 'hd95_mm': 10.0, 'asd_voxel': 1.0,
               'asd_mm': 2.5}
    return {'method': method, 'trainer': trainer, 'dataset': 'Dataset951_LA25mm_L2', 'metrics': metrics,
            'metrics_lcc': dict(metrics), 'train_wall_s': 600.0, 's_per_iteration': 1.25, 'load_avg_1min': [1.0, 2.0],
            'date': '2026-11-22 04:00 UTC', 'machine': {'cpu': 'test CPU', 'cores': 2, 'torch': 'x', 'nnunetv2': 'y'}}


def test_render_other_seed_own_section_and_gap_closed(tmp_path):
    """A non-default --seed gets its own JSON/section (so seeds can be compared side by side), and 'gap closed' is
    (Dice - Dice_a) / (Dice_b - Dice_a): 0.70 between 0.60 and 0.80 closes 50 %, 0.55 closes -25 %."""
    results = tmp_path / 'accuracy_seed7.json'
    rows = {'supervised_a': _row('supervised_a', 'nnUNetTrainer_semisegSchedule', 0.60),
            'supervised_b': _row('supervised_b', 'nnUNetTrainer_semisegSchedule', 0.80),
            'nnUNetTrainerMeanTeacher': _row('nnUNetTrainerMeanTeacher', 'nnUNetTrainerMeanTeacher', 0.70),
            'selftrain': dict(_row('selftrain', 'nnUNetTrainer_semisegSchedule', 0.55), teacher_train_wall_s=600.0,
                              pseudolabel_s=60.0)}
    results.write_text(json.dumps({'methods': rows}))
    markdown = tmp_path / 'bench.md'
    proc = subprocess.run([sys.executable, SCRIPT, '--render-only', '--seed', '7', '--epochs', '3',
                           '--iterations-per-epoch', '4', '--val-iterations', '1', '--results', str(results),
                           '--markdown', str(markdown), '--work', str(tmp_path / 'work')],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8', errors='replace',
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    text = markdown.read_text()
    assert '<!-- accuracy_la:cpu:labeled2:it12:test12:seed7:begin -->' in text, text
    assert '### Accuracy on real LA data: 2 labeled cases, CPU, 12 iterations, seed 7' in text
    lines = {l.split(' | ')[0][2:]: l for l in text.splitlines() if l.startswith('| ') and ' | `' in l}
    assert ' | 70.00 | ' in lines['nnUNetTrainerMeanTeacher'] and ' | 50 % | ' in lines['nnUNetTrainerMeanTeacher']
    assert ' | -25 % | ' in lines['selftrain'] and ' | 0 % (ref.) | ' in lines['supervised_a']
    # the one trainer not in the JSON is listed with the command that measures it on this seed and schedule
    assert ('`nnUNetTrainerSSNet` (run `python benchmarks/accuracy_la.py --method nnUNetTrainerSSNet --epochs 3 '
            '--iterations-per-epoch 4 --val-iterations 1 --seed 7`)') in text


def _seed_json(path, per_case):
    rows = {}
    for method, values in per_case.items():
        row = _row(method, 'T', sum(values.values()) / len(values))
        row.update(per_case_dice=values, per_case_hd95_voxel={c: 4.0 for c in values})
        rows[method] = row
    path.write_text(json.dumps({'methods': rows}))


def test_summary_across_seeds_and_figure(tmp_path):
    """accuracy_report: per-seed JSONs of one protocol are paired by (case, seed); the figure names every method
    (checked through matplotlib: axis tick labels and the seed legend) and is a valid PNG."""
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import accuracy_report
    results = tmp_path / 'results'
    results.mkdir()
    base = 'accuracy_la_labeled2_it300_test12'
    # seed 12345 (default file name) and seed 2; MT beats supervised_a by exactly 5 points on every pair,
    # supervised_b by 20: gap closed 25 % with a point interval
    for suffix, offset in (('', 0.0), ('_seed2', 0.1)):
        a = {f'c{i}': 0.5 + 0.02 * i + offset for i in range(3)}
        _seed_json(results / f'{base}{suffix}.json',
                   {'supervised_a': a, 'supervised_b': {c: v + 0.2 for c, v in a.items()},
                    'nnUNetTrainerMeanTeacher': {c: v + 0.05 for c, v in a.items()}})
    (results / f'{base}_seed7_cuda.json').write_text('{"methods": {}}')  # another protocol's file: ignored
    md, png = tmp_path / 'b.md', tmp_path / 'fig.png'
    data = accuracy_report.update(str(results), base, 12345, str(md), 'summary:test', str(png), 'T', 'D',
                                  replicates=200)
    assert sorted(data['dice']['supervised_a']) == ['12345', '2']
    c = data['comparisons']['nnUNetTrainerMeanTeacher']['vs_a']
    assert c.pairs == 6 and c.wins == 6 and c.difference == pytest.approx(0.05)
    assert c.gap_closed == pytest.approx(0.25) and c.gap_closed_ci == (pytest.approx(0.25), pytest.approx(0.25))
    text = md.read_text()
    line = next(l for l in text.splitlines() if l.startswith('| nnUNetTrainerMeanTeacher |'))
    assert '| +5.0 [+5.0, +5.0] | 6/6 | 25 % [25, 25 %] |' in line, line
    assert 'nnUNetTrainerMeanTeacher is better than supervised_a by +5.0 Dice points' in text

    fig = data['figure']
    ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in fig.axes]
    assert ticks[0] == ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher']
    assert ticks[1] == ['supervised_b', 'nnUNetTrainerMeanTeacher'] and ticks[2] == ['nnUNetTrainerMeanTeacher']
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ['seed 12345', 'seed 2']
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_schedule_and_weight_study_section_and_figure(tmp_path):
    """study_report: the learning curve of a long run (snapshots + final), its last paired step and its paired
    difference to supervised_a at the end; each weight variant against supervised_a and against its default
    (hand-built per-case values with known answers); the figure names every curve and every setting."""
    sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
    import study_report
    results = tmp_path / 'results'
    results.mkdir()
    a = {f'c{i}': 0.5 + 0.02 * i for i in range(3)}
    shift = lambda d, x: {c: v + x for c, v in d.items()}  # noqa: E731

    def row(method, final, snapshots=None):
        r = _row(method, 'T', sum(final.values()) / len(final))
        r.update(per_case_dice=final, per_case_hd95_voxel={c: 4.0 for c in final}, schedule=[50, 20, 2])
        if snapshots:
            r['snapshots'] = {k: {'per_case_dice': v, 'epoch': int(k) // 20} for k, v in snapshots.items()}
        return r

    long = {'supervised_a': row('supervised_a', a, {'300': shift(a, -0.1), '500': shift(a, -0.05), '700': a}),
            'supervised_b': row('supervised_b', shift(a, 0.2), {'300': shift(a, 0.1), '500': shift(a, 0.15),
                                                                '700': shift(a, 0.18)}),
            'nnUNetTrainerMeanTeacher': row('nnUNetTrainerMeanTeacher', shift(a, 0.05),
                                            {'300': a, '500': a, '700': shift(a, 0.03)})}
    (results / 'accuracy_la_labeled2_it1000_test12.json').write_text(json.dumps({'methods': long}))
    for suffix, offset in (('', 0.0), ('_seed2', 0.1)):
        b = shift(a, offset)
        short = {'supervised_a': b, 'supervised_b': shift(b, 0.2), 'nnUNetTrainerMeanTeacher': shift(b, 0.05),
                 'nnUNetTrainerMeanTeacher_consistency1': shift(b, 0.01), 'nnUNetTrainerSSNet': shift(b, 0.1),
                 'nnUNetTrainerSSNet_unsupervised01': shift(b, 0.1)}
        (results / f'accuracy_la_labeled2_it300_test12{suffix}.json').write_text(
            json.dumps({'methods': {m: dict(row(m, v), schedule=[15, 20, 2]) for m, v in short.items()}}))
    md, png = tmp_path / 'b.md', tmp_path / 'study.png'
    out = study_report.update(str(results), str(md), str(png), notes='Reading: hand-built.', replicates=200)
    text = md.read_text()
    lines = {l.split(' | ')[0][2:]: l for l in text.splitlines() if l.startswith('| ')}
    # curve: mean Dice 52 % at the end for supervised_a (cases 50, 52, 54), MT +5 at 1000 and +3 at 700
    assert '| supervised_a | 12345 | 42.00 | 47.00 | 52.00 | 52.00 | 700->1000: +0.0 [+0.0, +0.0] | ref. |' \
        in lines['supervised_a'], lines['supervised_a']
    mt_long = next(l for l in text.splitlines() if l.startswith('| nnUNetTrainerMeanTeacher | 12345 |'))
    assert '| 52.00 | 52.00 | 55.00 | 57.00 | 700->1000: +2.0 [+2.0, +2.0] | +5.0 [+5.0, +5.0] | 3/3 | 25 % ' \
        in mt_long, mt_long
    # the same method on the 300-iteration schedule, on the long run's seed only (12345: 57 %, not 62 with seed 2)
    assert mt_long.endswith('| 57.00 |'), mt_long
    # weights: consistency1 is 4 points below its default on every pair, SS-Net's variant equals its default
    cons = lines['nnUNetTrainerMeanTeacher_consistency1']
    assert '| consistency weight 1.0 (default 0.1) | 12345: 53.00, 2: 63.00 | +1.0 [+1.0, +1.0] | 6/6 | 5 % | ' \
           '-4.0 [-4.0, -4.0] | 0/6 |' in cons, cons
    assert '| -4.0 [-4.0, -4.0] |' not in lines['nnUNetTrainerSSNet_unsupervised01']
    assert '| +0.0 [+0.0, +0.0] | 0/6 |' in lines['nnUNetTrainerSSNet_unsupervised01']
    assert '| nnUNetTrainerMeanTeacher_ramp10 | ramp-up over 10 % of training (default 40 %) | n/a | n/a |' \
        in lines['nnUNetTrainerMeanTeacher_ramp10']  # not measured: listed, not invented
    assert ('nnUNetTrainerMeanTeacher_consistency1 is worse than nnUNetTrainerMeanTeacher by -4.0 Dice points'
            in text) and 'Reading: hand-built.\n<!-- accuracy_la:study:end -->' in text
    fig = out['figure']
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == sorted(
        ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher', '300-iteration schedule'])
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == [
        'nnUNetTrainerMeanTeacher', 'nnUNetTrainerMeanTeacher_consistency1', 'nnUNetTrainerSSNet',
        'nnUNetTrainerSSNet_unsupervised01']
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
