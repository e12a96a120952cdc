"""The demo's printed lines: per-epoch progress from nnU-Net's output, load note, gain and one-seed caveat."""
import sys

import pytest

from nnunetv2_semiseg.demo.pipeline import StepFailed, run_step
from nnunetv2_semiseg.demo.report import EpochProgress, format_summary, is_loaded, time_with_load

# Lines as nnUNetv2_train prints them (taken from a BCP run; our trainers add the train_<term> lines).
NNUNET_EPOCH = """2026-12-03 06:21:08.836571:  
2026-12-03 06:21:08.836724: Epoch 0 
2026-12-03 06:21:08.836906: Current learning rate: 0.01 
2026-12-03 06:21:36.237294: train_sup 0.4451 
2026-12-03 06:21:36.263848: train_loss 0.8381 
2026-12-03 06:21:36.263952: val_loss 0.2109 
2026-12-03 06:21:36.264050: Pseudo dice [np.float32(0.2647), np.float32(0.5)] 
2026-12-03 06:21:36.264175: Epoch time: 27.43 s 
2026-12-03 06:21:36.264299: Yayy! New best EMA pseudo Dice: 0.2646999955177307 """


def test_epoch_progress_one_line_per_epoch():
    progress = EpochProgress(8, sample_load=False)
    shown = [out for out in map(progress.feed, NNUNET_EPOCH.splitlines()) if out is not None]
    assert shown == ['epoch 1/8: train_loss 0.838 (sup 0.445), val_loss 0.211, pseudo Dice 0.26 / 0.50, 27.4 s']
    # The stock trainer has no train_sup line; values of the last epoch do not leak into the next one.
    second = [line.replace('Epoch 0', 'Epoch 1') for line in NNUNET_EPOCH.splitlines() if 'train_sup' not in line]
    shown = [out for out in map(progress.feed, second) if out is not None]
    assert shown == ['epoch 2/8: train_loss 0.838, val_loss 0.211, pseudo Dice 0.26 / 0.50, 27.4 s']
    # The silent minutes of nnU-Net's final validation are announced, and its result shown.
    assert progress.feed('2026-12-03 06:33:31.229390: Training done.') == \
        'training done; nnU-Net now predicts its validation cases (final validation)'
    assert progress.feed('2026-12-03 06:35:46.613139: Mean Validation Dice:  0.5299632247060168') == \
        'final validation: mean Dice 0.530'


def test_epoch_progress_samples_the_load(monkeypatch):
    loads = iter([3.0, 5.0])
    monkeypatch.setattr('nnunetv2_semiseg.demo.report.current_load', lambda: next(loads))
    progress = EpochProgress(2)
    for _ in range(2):
        for line in NNUNET_EPOCH.splitlines():
            progress.feed(line)
    assert progress.loads == [3.0, 5.0] and progress.mean_load == 4.0


def test_summary_gain_caveat_and_load_note():
    results = {'nnUNetTrainer_semisegSchedule': {'dice': 0.7512, 'hd95_voxel': 3.456, 'train_seconds': 100.4,
                                                 'load': 1.9},
               'nnUNetTrainerMeanTeacher': {'dice': 0.7834, 'hd95_voxel': 2.5, 'train_seconds': 250.0, 'load': 7.2}}
    lines = format_summary(results, 'nnUNetTrainer_semisegSchedule', 4, 16, 6, seed=0, cores=2)
    assert lines[2] == '| nnUNetTrainer_semisegSchedule | 4 / 0 | 0.7512 | 3.46 | 100 s |'
    assert lines[3] == ('| nnUNetTrainerMeanTeacher | 4 / 16 | 0.7834 | 2.50 | '
                        '250 s (loaded machine: load 7.2 on 2 cores) |')
    assert lines[5] == ('Gain of nnUNetTrainerMeanTeacher over supervised nnU-Net: +3.2 Dice points '
                        '(78.3 vs 75.1 % mean Dice on 6 test cases).')
    assert 'one seed (--seed 0)' in lines[6] and 'not a significance test' in lines[6]
    assert lines[7].startswith('Training times were taken on a loaded machine')
    # An idle machine: no load note, and a loss is shown with its sign.
    for r in results.values():
        r['load'] = 2.2
    results['nnUNetTrainerMeanTeacher']['dice'] = 0.7412
    lines = format_summary(results, 'nnUNetTrainer_semisegSchedule', 4, 16, 6, seed=3, cores=2)
    assert lines[5].startswith('Gain of nnUNetTrainerMeanTeacher over supervised nnU-Net: -1.0 Dice points')
    assert not any('loaded' in line for line in lines)


def test_load_threshold():
    assert not is_loaded(None, 2) and not is_loaded(3.0, 2) and is_loaded(3.1, 2)
    assert time_with_load(59.6, None, 4) == '60 s'


def test_run_step_streams_lines_and_keeps_errors():
    seen = []
    script = 'import time; print("Epoch 0"); time.sleep(0.2); print("Epoch time: 1.0 s")'
    out = run_step([sys.executable, '-c', script], {}, on_line=seen.append)
    assert seen == ['Epoch 0', 'Epoch time: 1.0 s'] and out == 'Epoch 0\nEpoch time: 1.0 s\n'
    with pytest.raises(StepFailed, match=r'exit 3.*\n.*boom'):
        run_step([sys.executable, '-c', 'print("boom"); raise SystemExit(3)'], {}, on_line=seen.append)
