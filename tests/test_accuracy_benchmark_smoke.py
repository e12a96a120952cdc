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
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8', errors='replace', timeout=1200)
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
