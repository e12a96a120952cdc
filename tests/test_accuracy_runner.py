"""The shared accuracy-benchmark runner (benchmarks/accuracy_common.py) and its two datasets: label draws, the
pairing of runs by (draw, seed, case), the label resampling of the data path, and a smoke run of the ACDC
benchmark on real ACDC volumes through the stock CLIs (``benchmarks/accuracy.py --dataset acdc --smoke``)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, 'benchmarks')
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import accuracy_common  # noqa: E402
import accuracy_report  # noqa: E402
import paired_stats as ps  # noqa: E402
from dataset_conversion.resample import resample_file  # noqa: E402
from nnunetv2_semiseg.utilities.real_data import real_data_folder  # noqa: E402

ACDC = real_data_folder('ACDC')


def test_label_draws_are_disjoint_consecutive_blocks_of_the_training_list():
    train = [f'c{i}' for i in range(1, 8)]
    assert accuracy_common.draw_labeled(train, 2, 0) == ['c1', 'c2']   # today's first cases
    assert accuracy_common.draw_labeled(train, 2, 1) == ['c3', 'c4']
    assert accuracy_common.draw_labeled(train, 2, 2) == ['c5', 'c6']
    with pytest.raises(ValueError, match='draw below 3'):
        accuracy_common.draw_labeled(train, 2, 3)                      # c7, c8: no unlabeled case would remain
    assert accuracy_common.draw_labeled(train, 3, 1) == ['c4', 'c5', 'c6']


def _write(path, per_case):
    rows = {m: {'per_case_dice': v, 'per_case_hd95_voxel': {c: 1.0 for c in v}} for m, v in per_case.items()}
    path.write_text(json.dumps({'methods': rows}))


def test_runs_pair_by_draw_seed_and_case(tmp_path):
    """Draw 0 keeps its seed keys; another draw's file is its own run; a comparison pairs equal (run, case)."""
    base = 'accuracy_x_labeled2_it300'
    _write(tmp_path / f'{base}.json', {'supervised_a': {'t1': 0.5, 't2': 0.6}, 'M': {'t1': 0.7, 't2': 0.6}})
    _write(tmp_path / f'{base}_seed2.json', {'supervised_a': {'t1': 0.4, 't2': 0.4}, 'M': {'t1': 0.5, 't2': 0.5}})
    _write(tmp_path / f'{base}_draw1.json', {'supervised_a': {'t1': 0.8, 't2': 0.8}, 'M': {'t1': 0.7, 't2': 0.6}})
    _write(tmp_path / f'{base}_draw1_seed2.json', {'supervised_a': {'t1': 0.9, 't2': 0.9}})  # M lacks this run
    data = accuracy_report.collect(str(tmp_path), base, 12345)
    assert sorted(data['dice']['supervised_a'], key=accuracy_report.run_order) == ['2', '12345', 'draw1:2',
                                                                                 'draw1:12345']
    assert set(data['dice']['M']) == {'12345', '2', 'draw1:12345'}
    c = ps.compare(data['dice']['M'], data['dice']['supervised_a'], replicates=200)
    # shared runs 12345, 2, draw1:12345; differences (0.2, 0.0), (0.1, 0.1), (-0.1, -0.2): mean -> 0.1/6
    assert c.pairs == 6 and c.difference == pytest.approx(0.1 / 6)
    assert c.wins == 3


def test_main_table_is_draw_0_and_the_draw_table_reports_each_draw(tmp_path):
    """The summary's main table keeps label draw 0 only (earlier tables stay as they were); the across-draws table
    gives, per draw, method / supervised_a means and their paired difference, the draws won, and the difference
    over all (draw, seed, case) pairs."""
    base = 'accuracy_x_labeled2_it300'
    _write(tmp_path / f'{base}.json', {'supervised_a': {'t1': 0.5, 't2': 0.6}, 'M': {'t1': 0.7, 't2': 0.6}})
    _write(tmp_path / f'{base}_draw1.json', {'supervised_a': {'t1': 0.8, 't2': 0.8}, 'M': {'t1': 0.7, 't2': 0.6}})
    data = accuracy_report.collect(str(tmp_path), base, 12345)
    main = accuracy_report.draw0(data)
    assert set(main['dice']['supervised_a']) == {'12345'} and set(main['dice']['M']) == {'12345'}
    lines = accuracy_report.draw_table(data, replicates=200)
    row = next(line for line in lines if line.startswith('| M |'))
    cells = [c.strip() for c in row.strip('|').split('|')]
    # draw 0: M 65.0 vs a 55.0, difference (0.2 + 0.0) / 2 = +10.0; draw 1: M 65.0 vs a 80.0, (-0.1 - 0.2) / 2 = -15.0
    assert cells[1].startswith('65.0 / 55.0, +10.0 [')
    assert cells[2].startswith('65.0 / 80.0, -15.0 [')
    assert cells[3] == '1/2'
    # all four (draw, case) pairs: (0.2 + 0.0 - 0.1 - 0.2) / 4 = -2.5 points
    assert cells[4].startswith('-2.5 [') and cells[4].endswith(', 4')
    # no other draw: no table
    _write(tmp_path / 'only0.json', {'supervised_a': {'t1': 0.5}, 'M': {'t1': 0.7}})
    assert accuracy_report.draw_table(accuracy_report.collect(str(tmp_path), 'only0', 12345)) == []


def _label_image(array_zyx, spacing_xyz):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    img.SetSpacing(spacing_xyz)
    return img


def test_resampled_labels_take_the_class_with_the_largest_interpolated_mask(tmp_path):
    """In-plane factor 2 on an h5-like grid (1, 1, 10): each new voxel centre sits in the middle of a 2 x 2 block,
    so its mask values are the block's class fractions; the largest wins, ties go to the higher class; the slice
    axis is untouched."""
    import SimpleITK as sitk
    plane = np.array([[1, 1, 0, 0],
                      [2, 2, 0, 3],
                      [3, 3, 1, 2],
                      [3, 0, 3, 0]])
    src, dst = str(tmp_path / 'l.nii.gz'), str(tmp_path / 'r.nii.gz')
    sitk.WriteImage(_label_image(np.stack([plane, plane[::-1]]), (1.0, 1.0, 10.0)), src)
    resample_file(src, dst, True, (2.0, 2.0, None), num_classes=4)
    out = sitk.ReadImage(dst)
    assert out.GetSpacing() == (2.0, 2.0, 10.0) and out.GetSize() == (2, 2, 2)
    got = sitk.GetArrayFromImage(out)
    # blocks of slice 0: [1,1,2,2] tie 1/2 -> 2; [0,0,0,3] -> 0; [3,3,3,0] -> 3; [1,2,3,0] four-way tie -> 3
    assert got[0].tolist() == [[2, 0], [3, 3]]
    # slice 1 is slice 0 upside down: blocks [3,0,3,3] -> 3; [3,0,1,2] tie -> 3; [2,2,1,1] -> 2; [0,3,0,0] -> 0
    assert got[1].tolist() == [[3, 3], [2, 0]]
    # binary labels: mask >= 0.5 (the LA data path), a half-covered block is foreground
    plane2 = (plane >= 2).astype(np.uint8)   # blocks [0,0,1,1] [0,0,0,1] [1,1,1,0] [0,1,1,0]
    sitk.WriteImage(_label_image(np.stack([plane2, plane2]), (1.0, 1.0, 10.0)), src)
    resample_file(src, dst, True, (2.0, 2.0, None), num_classes=2)
    assert sitk.GetArrayFromImage(sitk.ReadImage(dst))[0].tolist() == [[1, 0], [1, 1]]


@pytest.mark.skipif(not os.path.isdir(os.path.join(ACDC, 'data')),
                    reason='real ACDC h5 data not found (set nnUNet_semiseg_ACDC_h5)')
def test_acdc_smoke_run_scores_per_volume_and_class(tmp_path):
    """The ACDC path end to end on real volumes: convert (h5) + in-plane resampling, stock 2d planning,
    nnUNetv2_train / nnUNetv2_predict, per-class scoring of every test volume, the table with per-class Dice; and
    BCP's teacher-at-switch diagnostic (--switch-diagnostic), scored on the unlabeled volumes' hidden labels."""
    work = tmp_path / 'work'
    proc = subprocess.run([sys.executable, os.path.join(BENCH, 'accuracy.py'), '--dataset', 'acdc', '--smoke',
                           '--method', 'supervised_a', 'nnUNetTrainerBCP', '--switch-diagnostic',
                           '--work', str(work)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8', errors='replace',
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:]
    results = json.loads((work / 'results' / 'accuracy_acdc_smoke.json').read_text())
    row = results['methods']['supervised_a']
    assert results['settings']['configuration'] == '2d' and results['settings']['inplane_factor'] == 4
    # the first test patient of the SSL4MIS list, both frames (ED, ES)
    assert row['test_cases'] == ['patient011_frame01', 'patient011_frame02']
    assert set(row['per_class']) == {'RV', 'MYO', 'LV'}
    for case, per_class in row['per_case_class_dice'].items():   # per volume: the mean over the three classes
        assert row['per_case_dice'][case] == pytest.approx(np.mean(list(per_class.values())))
    assert row['metrics']['dice'] == pytest.approx(np.mean([row['per_class'][k]['dice'] for k in row['per_class']]))
    plans = json.loads(next((work / 'nnUNet_preprocessed').glob('Dataset988_*/nnUNetPlans.json')).read_text())
    assert '2d' in plans['configurations']
    assert row['batch_size'] == plans['configurations']['2d']['batch_size']   # what the training used, per row
    text = (work / 'benchmarks_smoke.md').read_text()
    assert '| Dice % RV / MYO / LV |' in text and '<!-- accuracy_acdc:cpu:smoke:begin -->' in text
    _check_teacher_at_switch(work, results)


def _dice(prediction, reference, label):
    p, r = prediction == label, reference == label
    return 1.0 if p.sum() + r.sum() == 0 else 2.0 * (p & r).sum() / (p.sum() + r.sum())


def _check_teacher_at_switch(work, results):
    """BCP's row holds the switch checkpoint's Dice on exactly the unlabeled volumes (the smoke's training patients
    after the 3 labeled ones), each against that volume's own ground truth, recomputed here with numpy."""
    import SimpleITK as sitk
    assert 'teacher_at_switch' not in results['methods']['supervised_a']   # no phase switch, no diagnostic
    d = results['methods']['nnUNetTrainerBCP']['teacher_at_switch']
    train = [p for p in open(os.path.join(REPO, 'dataset_conversion', 'splits', 'acdc_train_patients.txt')).read()
             .split() if os.path.isfile(os.path.join(ACDC, 'data', f'{p}_frame01.h5'))]
    unlabeled = sorted(f'{p}_frame0{n}' for p in train[3:5] for n in (1, 2))
    assert sorted(d['per_case_dice']) == unlabeled and d['num_cases'] == 4 and d['tta'] is False
    assert d['step'] == round(2000 / 17000 * 2)     # the smoke schedule: 2 iterations
    model = next(work.glob('nnUNet_results/Dataset988_*/nnUNetTrainerBCP__nnUNetPlans__2d/fold_all'))
    assert (model / 'checkpoint_switch.pth').is_file()
    predictions = work / 'predictions' / 'smoke' / 'nnUNetTrainerBCP_switch'
    labels = next(work.glob('nnUNet_raw/Dataset984_*/labelsTr'))
    for case in unlabeled:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f'{case}.nii.gz')))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f'{case}.nii.gz')))
        assert not np.array_equal(pred, ref)   # a real comparison: the prediction is not its own reference
        expected = np.mean([_dice(pred, ref, k) for k in (1, 2, 3)])
        assert d['per_case_dice'][case] == pytest.approx(expected, abs=1e-6)
    text = (work / 'benchmarks_smoke.md').read_text()
    assert "Teacher at BCP's phase switch" in text and '`nnUNetTrainerBCP` step 0' in text


def test_acdc_upper_bound_and_selftrain_student_train_with_the_labeled_sets_batch(tmp_path):
    """nnU-Net plans a 50-patient set with a far larger 2d batch than the 3-patient set (its batch is capped at 5 %
    of the dataset's voxels): the upper bound and the self-training student (3 labeled + 47 pseudo-labelled) take
    (a)'s batch, and the planned value is kept on record."""
    import argparse
    import accuracy_acdc
    for dataset_id, name, batch in ((981, 'ACDCx2_L3', 3), (984, 'ACDCx2_L50', 43), (985, 'ACDCx2_L3PL', 41)):
        os.makedirs(tmp_path / 'nnUNet_raw' / f'Dataset{dataset_id}_{name}')
        pre = tmp_path / 'nnUNet_preprocessed' / f'Dataset{dataset_id}_{name}'
        os.makedirs(pre)
        (pre / 'nnUNetPlans.json').write_text(json.dumps(
            {'configurations': {'2d': {'batch_size': batch, 'patch_size': [128, 112]}}}))
    args = argparse.Namespace(work=str(tmp_path), spec=accuracy_acdc.ACDC, extra_settings={})
    ids = {'a': 981, 'b': 984, 'self': 985}
    accuracy_acdc.train_with_the_labeled_batch(args, ids, 'a')   # (a) is left as planned
    plans_a = tmp_path / 'nnUNet_preprocessed' / 'Dataset981_ACDCx2_L3' / 'nnUNetPlans.json'
    assert json.loads(plans_a.read_text())['configurations']['2d']['batch_size'] == 3
    plans_b = tmp_path / 'nnUNet_preprocessed' / 'Dataset984_ACDCx2_L50' / 'nnUNetPlans.json'
    assert json.loads(plans_b.read_text())['configurations']['2d']['batch_size'] == 43
    for _ in range(2):  # a reused dataset keeps (and reports) what was changed when it was built
        accuracy_acdc.train_with_the_labeled_batch(args, ids, 'b')
        plans = json.loads(plans_b.read_text())['configurations']['2d']
        assert plans == {'batch_size': 3, 'patch_size': [128, 112]}
        assert args.extra_settings['upper_bound_batch'] == {'planned': 43, 'used': 3}
    assert 'selftrain_batch' not in args.extra_settings
    accuracy_acdc.train_with_the_labeled_batch(args, ids, 'self')
    plans_self = tmp_path / 'nnUNet_preprocessed' / 'Dataset985_ACDCx2_L3PL' / 'nnUNetPlans.json'
    assert json.loads(plans_self.read_text())['configurations']['2d'] == {'batch_size': 3, 'patch_size': [128, 112]}
    assert args.extra_settings['selftrain_batch'] == {'planned': 41, 'used': 3}


def test_selftrain_retrains_its_teacher_unless_the_checkpoint_is_this_seed_schedule_and_draw(tmp_path, monkeypatch):
    """One supervised_a model folder serves every seed and schedule of a work folder: selftrain must train its own
    teacher when the checkpoint there came from another seed, schedule or draw (or carries no record)."""
    from types import SimpleNamespace
    folder = tmp_path / 'model'
    folder.mkdir()
    (folder / 'checkpoint_final.pth').write_bytes(b'x')
    args = SimpleNamespace(seed=2, schedule_values=(15, 20, 2), labeled_draw=0, labeled_ids=[], device='cpu',
                           num_workers=0, disable_tta=False, switch_diagnostic=False, snapshot_epochs=None,
                           work=str(tmp_path), _pseudolabel_s=1.0, spec=SimpleNamespace(prefix='test'))
    trained = []

    def fake_train(a, dataset_id, trainer, tag):
        trained.append(tag)
        if tag == 'supervised_a':
            accuracy_common.write_json_atomically(str(folder / accuracy_common.RUN_MARKER),
                                                  accuracy_common.run_identity(a))
        return {'train_wall_s': 5.0, 's_per_iteration': 0.1}

    monkeypatch.setattr(accuracy_common, 'model_folder', lambda a, i, t: str(folder))
    monkeypatch.setattr(accuracy_common, 'train', fake_train)
    monkeypatch.setattr(accuracy_common, 'pseudolabel', lambda a, ids: str(tmp_path / 'union'))
    planned = []   # the union is planned as arm 'self', so a dataset can adjust its plans (ACDC: (a)'s batch)
    monkeypatch.setattr(accuracy_common, 'plan_and_preprocess', lambda a, dataset_id, **k: planned.append(
        (dataset_id, k.get('arm'))))
    monkeypatch.setattr(accuracy_common, 'merge_row', lambda a, results, row: results['methods'].update(
        {row['method']: row}))
    monkeypatch.setattr(accuracy_common, 'predict_and_evaluate', lambda *a, **k: {
        'metrics': {'dice': 0.5, 'jaccard': 0.4, 'hd95_voxel': 1.0, 'asd_voxel': 1.0}})
    ids, raw = {'a': 1, 'self': 2}, {'a': str(tmp_path / 'a')}

    def run_selftrain():
        trained.clear()
        results = {'methods': {'supervised_a': {'train_wall_s': 7.0}}}
        accuracy_common.run_method(args, 'selftrain', ids, dict(raw), results)
        return list(trained)

    assert run_selftrain() == ['supervised_a', 'selftrain']      # checkpoint without a record: not trusted
    assert planned == [(2, 'self')]
    assert run_selftrain() == ['selftrain']                      # now recorded for seed 2, 300 iterations
    args.seed = 12345
    assert run_selftrain() == ['supervised_a', 'selftrain']      # another seed's teacher
    args.schedule_values = (50, 20, 2)
    assert run_selftrain() == ['supervised_a', 'selftrain']      # the 1000-iteration teacher
    args.labeled_draw = 1
    assert run_selftrain() == ['supervised_a', 'selftrain']      # another label draw
    assert run_selftrain() == ['selftrain']


def test_a_retrained_teacher_leaves_the_supervised_a_row_and_is_reported_in_the_selftrain_row(tmp_path, monkeypatch):
    """supervised_a is the reference of every comparison: the teacher selftrain retrains (a CPU rerun of the same seed
    is not bit-identical) must not replace it; its scores go into the selftrain row and the table's footnote."""
    from types import SimpleNamespace
    args = SimpleNamespace(seed=2, schedule_values=(15, 20, 2), labeled_draw=0, labeled_ids=[], device='cpu',
                           num_workers=0, disable_tta=False, switch_diagnostic=False, snapshot_epochs=None,
                           work=str(tmp_path), _pseudolabel_s=60.0, spec=SimpleNamespace(prefix='test'))
    scores = {'supervised_a': 0.35, 'selftrain': 0.41}
    monkeypatch.setattr(accuracy_common, 'model_folder', lambda a, i, t: str(tmp_path))   # no record: retrain
    monkeypatch.setattr(accuracy_common, 'train', lambda a, i, t, tag: {'train_wall_s': {'supervised_a': 120.0}
                                                                        .get(tag, 300.0), 's_per_iteration': 0.1})
    monkeypatch.setattr(accuracy_common, 'pseudolabel', lambda a, ids: str(tmp_path / 'union'))
    monkeypatch.setattr(accuracy_common, 'plan_and_preprocess', lambda *a, **k: None)
    merged = []
    monkeypatch.setattr(accuracy_common, 'merge_row', lambda a, results, row: merged.append(row['method']))
    monkeypatch.setattr(accuracy_common, 'predict_and_evaluate', lambda a, i, t, r, tag: {
        'metrics': {'dice': scores[tag], 'jaccard': 0.3, 'hd95_voxel': 1.0, 'asd_voxel': 1.0},
        'per_case_dice': {'v1': scores[tag]}})
    earlier = {'method': 'supervised_a', 'train_wall_s': 200.0, 'metrics': {'dice': 0.33}}
    results = {'methods': {'supervised_a': dict(earlier)}}
    row = accuracy_common.run_method(args, 'selftrain', {'a': 1, 'self': 2}, {'a': str(tmp_path)}, results)
    assert merged == [] and results['methods']['supervised_a'] == earlier
    assert row['teacher_run']['metrics']['dice'] == 0.35 and row['teacher_run']['per_case_dice'] == {'v1': 0.35}
    assert row['teacher_train_wall_s'] == 120.0 and row['metrics']['dice'] == 0.41
    assert 'Dice 35.00 %' in accuracy_common.teacher_rerun_note(row)
    # without an earlier row the teacher becomes the supervised_a row, as before
    row = accuracy_common.run_method(args, 'selftrain', {'a': 1, 'self': 2}, {'a': str(tmp_path)}, {'methods': {}})
    assert merged == ['supervised_a'] and 'teacher_run' not in row


def test_a_rerun_replaces_the_row_and_keeps_the_earlier_runs_scores(tmp_path, monkeypatch):
    """A method run again (e.g. BCP with the switch diagnostic) shows its latest run; the replaced runs' scores stay
    in the row and under the table, so the CPU's run-to-run spread is visible instead of silently overwritten."""
    from types import SimpleNamespace
    monkeypatch.setattr(accuracy_common, 'render', lambda a, r: None)
    monkeypatch.setattr(accuracy_common, 'render_summary', lambda a: None)
    monkeypatch.setattr(accuracy_common, 'settings', lambda a: {'seed': 12345})
    args = SimpleNamespace(results=str(tmp_path / 'results' / 'r.json'), work=str(tmp_path))

    def run(dice, date):
        return {'method': 'nnUNetTrainerBCP', 'date': date, 'metrics': {'dice': dice}, 'per_case_dice': {'c1': dice},
                'train_wall_s': 10.0, 'teacher_at_switch': {'step': 35}}

    results = {'methods': {}}
    accuracy_common.merge_row(args, results, run(0.70, 'd1'))
    assert 'earlier_runs' not in results['methods']['nnUNetTrainerBCP']
    accuracy_common.merge_row(args, results, run(0.72, 'd2'))
    accuracy_common.merge_row(args, results, run(0.68, 'd3'))
    with open(args.results) as f:
        row = json.load(f)['methods']['nnUNetTrainerBCP']
    assert row['metrics']['dice'] == 0.68 and row['date'] == 'd3'
    assert [e['metrics']['dice'] for e in row['earlier_runs']] == [0.70, 0.72]
    assert row['earlier_runs'][0] == {'date': 'd1', 'metrics': {'dice': 0.70}, 'per_case_dice': {'c1': 0.70},
                                      'train_wall_s': 10.0}
    note = accuracy_common.earlier_runs_note({'nnUNetTrainerBCP': row}, ['nnUNetTrainerBCP'])
    assert '`nnUNetTrainerBCP` earlier 70.00 % (d1), 72.00 % (d2)' in note
