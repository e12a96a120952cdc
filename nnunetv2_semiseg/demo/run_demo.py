"""``nnUNetv2_semiseg_demo``: the whole semi-supervised chain on a small synthetic 3D dataset.

Builds a dataset with few labeled cases, several times more unlabeled ones and a labeled test set (blobs with
blurred, low-contrast boundaries), then runs, as a user would:

    nnUNetv2_extract_fingerprint / nnUNetv2_plan_experiment   (stock; plans shrunk for a CPU)
    nnUNetv2_preprocess                                        (stock)
    nnUNetv2_semiseg_preprocess_unlabeled                      (ours)
    nnUNetv2_train ... -tr nnUNetTrainer_semisegSchedule       (supervised baseline, labeled cases only)
    nnUNetv2_train ... -tr <semi-supervised trainer>           (labeled + unlabeled)
    nnUNetv2_predict ... (both models, test set)               (stock)
    nnUNetv2_semiseg_evaluate                                  (ours)

and prints the test Dice of both, the gain in Dice points, and the training times with a note when other work
loaded the machine. Both trainings use the same short schedule and seed; while they run, one line per epoch shows
nnU-Net's losses and pseudo Dice.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence

DEMO_DATASET_ID = 987
DEMO_NAME = 'SemiSegDemo'
DEMO_PLANS = 'nnUNetPlansDemo'
BASELINE_TRAINER = 'nnUNetTrainer_semisegSchedule'


def _say(message: str) -> None:
    print(f'[demo {time.strftime("%H:%M:%S")}] {message}', flush=True)


def _show_epoch(progress, line: str) -> None:
    summary = progress.feed(line)
    if summary is not None:
        _say('    ' + summary)


def run_demo(trainer: str = 'nnUNetTrainerMeanTeacher', output: Optional[str] = None, device: str = 'cpu',
             epochs: int = 8, iterations_per_epoch: int = 25, num_labeled: int = 4, num_unlabeled: int = 16,
             num_test: int = 6, seed: int = 0) -> dict:
    from nnunetv2_semiseg.demo.pipeline import (nnunet_env, plan_and_preprocess_tiny, predict, train,
                                                training_env)
    from nnunetv2_semiseg.demo.report import EpochProgress, format_summary, machine_cores
    from nnunetv2_semiseg.demo.synthetic import make_synthetic_dataset
    from nnunetv2_semiseg.evaluation.evaluate import evaluate_folders

    started = time.time()
    base = output or tempfile.mkdtemp(prefix='nnunetv2_semiseg_demo_')
    os.makedirs(base, exist_ok=True)
    log_file = os.path.join(base, 'demo_commands.log')
    env = nnunet_env(base, {'nnUNet_n_proc_DA': '0', 'nnUNet_def_n_proc': '1'})
    _say(f'working folder: {base} (full command output in {log_file})')

    _say(f'1/6 synthetic dataset: {num_labeled} labeled, {num_unlabeled} unlabeled, {num_test} test cases')
    raw = make_synthetic_dataset(env['nnUNet_raw'], DEMO_DATASET_ID, DEMO_NAME, num_labeled, num_unlabeled,
                                 num_test, shape=(32, 48, 48), seed=seed, overwrite=True)
    for sub in ('nnUNet_preprocessed', 'nnUNet_results'):
        shutil.rmtree(os.path.join(env[sub], os.path.basename(raw)), ignore_errors=True)

    _say('2/6 fingerprint, planning (plans shrunk for a CPU), preprocessing, unlabeled preprocessing')
    plan_and_preprocess_tiny(env, DEMO_DATASET_ID, ('3d_fullres',), plans_name=DEMO_PLANS, features=(16, 32, 64),
                             patch_3d=(24, 40, 40), batch_size=2, log_file=log_file)

    schedule = training_env(env, epochs, iterations_per_epoch, val_iterations=2)
    schedule['nnUNet_semiseg_seed'] = str(seed)
    results = {}
    for step, name in ((3, BASELINE_TRAINER), (4, trainer)):
        _say(f'{step}/6 nnUNetv2_train {DEMO_DATASET_ID} 3d_fullres all -tr {name} '
             f'({epochs} epochs x {iterations_per_epoch} iterations)')
        progress = EpochProgress(epochs)
        seconds = train(schedule, DEMO_DATASET_ID, '3d_fullres', 'all', name, DEMO_PLANS, device,
                        log_file=log_file, on_line=lambda line: _show_epoch(progress, line))
        results[name] = {'train_seconds': seconds, 'load': progress.mean_load}

    _say('5/6 nnUNetv2_predict on the test set with both models')
    for name in results:
        out = os.path.join(base, 'predictions', name)
        predict(schedule, os.path.join(raw, 'imagesTs'), out, DEMO_DATASET_ID, '3d_fullres', 'all', name,
                DEMO_PLANS, device, log_file=log_file)
        results[name]['predictions'] = out

    _say('6/6 evaluation against labelsTs')
    for name, r in results.items():
        summary = evaluate_folders(os.path.join(raw, 'labelsTs'), r['predictions'])
        r['dice'] = summary['foreground_mean']['dice']
        r['hd95_voxel'] = summary['foreground_mean']['hd95_voxel']

    print()
    for line in format_summary(results, BASELINE_TRAINER, num_labeled, num_unlabeled, num_test, seed,
                               machine_cores()):
        print(line)
    print()
    _say(f'done in {time.time() - started:.0f} s. Models: {os.path.join(env["nnUNet_results"])}')
    return results


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_demo',
        description='Build a small synthetic 3D dataset with unlabeled images and run the whole nnU-Net chain '
                    '(plan, preprocess, preprocess unlabeled, train supervised and semi-supervised, predict, '
                    'evaluate); prints the test Dice of both models. About 5-10 minutes on a 2-core CPU.')
    parser.add_argument('--trainer', default='nnUNetTrainerMeanTeacher',
                        help='Semi-supervised trainer to compare with nnU-Net (default nnUNetTrainerMeanTeacher)')
    parser.add_argument('--output', default=None, help='Working folder (default: a new temporary folder)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'], help='Training device (default cpu)')
    parser.add_argument('--epochs', type=int, default=8, help='Epochs of the short schedule (default 8)')
    parser.add_argument('--iterations', type=int, default=25, help='Iterations per epoch (default 25)')
    parser.add_argument('--seed', type=int, default=0, help='Seed of the synthetic data (default 0)')
    from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings
    args = accept_underscore_spellings(parser).parse_args(argv)
    try:
        run_demo(args.trainer, args.output, args.device, args.epochs, args.iterations, seed=args.seed)
    except Exception as e:  # show the failing step's output, not a long traceback through subprocess
        print(f'ERROR: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
