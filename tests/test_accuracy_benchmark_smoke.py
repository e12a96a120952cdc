"""Smoke run of the accuracy benchmark (benchmarks/accuracy_la.py --smoke) on real LA cases, so it cannot rot.

Two labeled + two unlabeled training cases and one test case of ../shared/data/la_h5_uamt_subset, resampled to 5 mm,
one epoch of two iterations for the supervised arm and Mean Teacher, through the stock CLIs; the table goes to a
markdown file in the temporary work folder (docs/ is not touched).
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


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, '2018LA_Seg_Training Set')),
                    reason=f'real LA subset not found at {DATA} (the smoke run needs the h5 cases)')
def test_accuracy_benchmark_smoke(tmp_path):
    work = tmp_path / 'work'
    docs = os.path.join(REPO, 'docs', 'benchmarks.md')
    proc = subprocess.run([sys.executable, SCRIPT, '--smoke', '--work', str(work), '--method', *METHODS],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8', errors='replace',
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:]

    with open(work / 'results' / 'accuracy_la_smoke.json') as f:
        results = json.load(f)
    assert set(results['methods']) == set(METHODS)
    for method in METHODS:
        row = results['methods'][method]
        for key in ('dice', 'jaccard'):
            assert math.isfinite(row['metrics'][key]) and 0.0 <= row['metrics'][key] <= 1.0, (method, row['metrics'])
            assert math.isfinite(row['metrics_lcc'][key]), (method, row['metrics_lcc'])
        assert row['epochs'] == 1 and row['iterations_per_epoch'] == 2
        assert row['train_wall_s'] > 0 and row['s_per_iteration'] > 0
        assert row['num_test'] == 1
    assert results['settings']['spacing_mm'] == 5.0 and results['settings']['num_train'] == 4

    markdown = (work / 'benchmarks_smoke.md').read_text()
    assert '<!-- accuracy_la:cpu:smoke:begin -->' in markdown and '<!-- accuracy_la:cpu:smoke:end -->' in markdown
    for method in METHODS:
        line = next((l for l in markdown.splitlines() if l.startswith(f'| {method} |')), None)
        assert line is not None, markdown
        assert f'{results["methods"][method]["metrics"]["dice"] * 100:.2f}' in line
    assert 'Not yet measured' in markdown and 'supervised_b' in markdown  # methods not run are named, no numbers
    # the smoke run writes its table to the work folder, never into the repository's docs (which other runs may
    # be editing concurrently, so only the smoke section's absence is checked)
    assert not os.path.isfile(docs) or 'accuracy_la:cpu:smoke' not in open(docs).read()


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
    assert '<!-- accuracy_la:cpu:labeled2:it12:seed7:begin -->' in text, text
    assert '### Accuracy on real LA data: 2 labeled cases, CPU, 12 iterations, seed 7' in text
    lines = {l.split(' | ')[0][2:]: l for l in text.splitlines() if l.startswith('| ') and ' | `' in l}
    assert ' | 70.00 | ' in lines['nnUNetTrainerMeanTeacher'] and ' | 50 % | ' in lines['nnUNetTrainerMeanTeacher']
    assert ' | -25 % | ' in lines['selftrain'] and ' | 0 % (ref.) | ' in lines['supervised_a']
    # the one trainer not in the JSON is listed with the command that measures it on this seed and schedule
    assert ('`nnUNetTrainerSSNet` (run `python benchmarks/accuracy_la.py --method nnUNetTrainerSSNet --epochs 3 '
            '--iterations-per-epoch 4 --val-iterations 1 --seed 7`)') in text
