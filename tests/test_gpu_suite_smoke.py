"""``benchmarks/gpu_suite.py --device cpu --smoke``: every step of the GPU validation suite runs on a CPU.

Steps: (a) end to end through the stock CLIs (train, ``--c``, strict predict) on a synthetic dataset; (b) the
iteration-cost benchmark with both baselines (``nnUNetTrainer`` and ``nnUNetTrainer`` on twice the batch); (c) the
accuracy benchmark's smoke run on real LA cases (two labeled + two unlabeled training cases, one test case, 5 mm,
one epoch of two iterations for supervised_a and Mean Teacher), whose per-seed table and across-seed summary and
figure go to the work folder (docs/ is not touched).
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(REPO, 'benchmarks', 'gpu_suite.py')
DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'la_h5_uamt_subset'))
METHODS = ['supervised_a', 'nnUNetTrainerMeanTeacher']


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, '2018LA_Seg_Training Set')),
                    reason=f'real LA subset not found at {DATA} (the accuracy step needs the h5 cases)')
def test_gpu_suite_smoke_runs_every_step(tmp_path):
    work = tmp_path / 'suite'
    docs = os.path.join(REPO, 'docs', 'benchmarks.md')
    docs_before = open(docs).read() if os.path.isfile(docs) else None
    proc = subprocess.run([sys.executable, SUITE, '--device', 'cpu', '--smoke', '--work', str(work)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8', errors='replace',
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-6000:]
    with open(work / 'gpu_suite_smoke.json') as f:
        record = json.load(f)
    steps = record['steps']

    # (a) end to end: the run trained, resumed and predicted both test cases
    (run,) = steps['e2e']['runs']
    assert run['trainer'] == 'nnUNetTrainerMeanTeacher' and run['ok'], run
    fold = (work / 'e2e' / 'nnUNet_results' / 'Dataset981_GpuSuite' /
            'nnUNetTrainerMeanTeacher__nnUNetPlansTiny__3d_fullres' / 'fold_0')
    assert (fold / 'checkpoint_final.pth').is_file()
    assert len([p for p in os.listdir(fold) if p.startswith('training_log')]) == 2  # the first run and the --c run
    # (b) iteration cost: both baselines and the trainer, the twice-the-batch baseline really has twice the rows
    cost = {r['trainer']: r for r in steps['iteration_cost']['results']}
    assert set(cost) == {'nnUNetTrainer', 'nnUNetTrainer@2xbatch', 'nnUNetTrainerMeanTeacher'}
    assert cost['nnUNetTrainer@2xbatch']['batch_size'] == 2 * cost['nnUNetTrainer']['batch_size']
    assert cost['nnUNetTrainer@2xbatch']['gflops_per_step'] == pytest.approx(
        2 * cost['nnUNetTrainer']['gflops_per_step'], rel=0.05)
    # (c) accuracy: both methods ran through the accuracy benchmark
    assert [(r['method'], r['ok']) for r in steps['accuracy']['runs']] == [(m, True) for m in METHODS]
    markdown = (work / 'benchmarks_smoke.md').read_text()
    assert '<!-- gpu_suite:cpu:begin -->' in markdown and 'nnUNetTrainerMeanTeacher' in markdown

    # the accuracy benchmark's own outputs (formerly its separate smoke test)
    acc_work = work / 'accuracy_seed12345'
    with open(acc_work / 'results' / 'accuracy_la_smoke.json') as f:
        results = json.load(f)
    assert set(results['methods']) == set(METHODS)
    for method in METHODS:
        row = results['methods'][method]
        for key in ('dice', 'jaccard'):
            assert math.isfinite(row['metrics'][key]) and 0.0 <= row['metrics'][key] <= 1.0, (method, row['metrics'])
            assert math.isfinite(row['metrics_lcc'][key]), (method, row['metrics_lcc'])
        assert row['epochs'] == 1 and row['iterations_per_epoch'] == 2
        assert row['train_wall_s'] > 0 and row['s_per_iteration'] > 0
        assert row['num_test'] == 1 and len(row['test_cases']) == 1
    assert results['settings']['spacing_mm'] == 5.0 and results['settings']['num_train'] == 4
    acc_md = (acc_work / 'benchmarks_smoke.md').read_text()
    assert '<!-- accuracy_la:cpu:smoke:begin -->' in acc_md and '<!-- accuracy_la:cpu:smoke:end -->' in acc_md
    for method in METHODS:
        line = next((l for l in acc_md.splitlines() if l.startswith(f'| {method} |')), None)
        assert line is not None, acc_md
        assert f'{results["methods"][method]["metrics"]["dice"] * 100:.2f}' in line
    assert 'Not yet measured' in acc_md and 'supervised_b' in acc_md  # methods not run are named, no numbers
    # the across-seed summary (paired statistics) and its figure, rendered from the same tiny run
    summary = acc_md.split('<!-- accuracy_la:summary:cpu:smoke:begin -->')[1].split('<!-- accuracy_la:summary')[0]
    mt_line = next(l for l in summary.splitlines() if l.startswith('| nnUNetTrainerMeanTeacher |'))
    mt, sa = (results['methods'][m]['per_case_dice'] for m in ('nnUNetTrainerMeanTeacher', 'supervised_a'))
    (case,) = mt  # one test case, one seed: the paired difference is that case's difference, a point interval
    diff = (mt[case] - sa[case]) * 100
    assert f'| {diff:+.1f} [{diff:+.1f}, {diff:+.1f}] |' in mt_line, mt_line
    with open(acc_work / 'accuracy_la_smoke.png', 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    # smoke output never goes into the repository's docs
    if docs_before is not None:
        assert 'gpu_suite:cpu' not in open(docs).read() and 'accuracy_la:cpu:smoke' not in open(docs).read()
