#!/usr/bin/env python
"""Accuracy benchmark on real data: the LA subset in ``../shared/data/la_h5_uamt_subset`` (20 training cases and
every test case present, 12 in today's subset, of the UA-MT h5 release; the row records which), resampled to
2.5 mm isotropic so that a run fits a 2-core CPU.

Datasets (built once per ``--work`` folder with the LA converter, then resampled with SimpleITK):

- (a) ``--labeled`` (2 by default, or 1) labeled + the other training cases unlabeled, the test cases;
- (b) all 20 training cases labeled (the upper bound), the same test cases;
- the self-training union (a + pseudo-labels of (a)'s unlabeled cases), made by ``nnUNetv2_semiseg_pseudolabel``.

Methods (``--method``, one or more, run one after the other; each merges its row into the results JSON and the
markdown table, so slow methods can run in another sitting):

- ``supervised_a`` / ``supervised_b``: stock supervised ``nnUNetTrainer`` (as ``nnUNetTrainer_semisegSchedule``, which
  only honours the schedule variables) on (a) / (b);
- ``selftrain``: pseudo-label (a)'s unlabeled cases with the ``supervised_a`` model (trained first if missing),
  plan + preprocess the union and train the supervised trainer on it;
- any trainer name (``nnUNetTrainerMeanTeacher``, ``nnUNetTrainerSSNet``, ...): that trainer on (a).

Every run goes through the stock CLIs (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train ... all``,
``nnUNetv2_predict`` with the final checkpoint) plus ours, on the same schedule with a fixed seed. The test cases
are evaluated with ``evaluate_folders`` (Dice, Jaccard, 95HD, ASD; plain and with the largest connected component).

    python benchmarks/accuracy_la.py --method supervised_a supervised_b nnUNetTrainerMeanTeacher
    python benchmarks/accuracy_la.py --method selftrain
    python benchmarks/accuracy_la.py --render-only                  # rebuild the markdown table from the JSON
    python benchmarks/accuracy_la.py --smoke --work /tmp/x          # a few iterations on 5 real cases (the test)
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPT_DIR)
if SCRIPT_DIR not in sys.path:
    sys.path.insert(0, SCRIPT_DIR)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from iteration_cost import replace_section  # noqa: E402  (the lead's markdown section writer)

from nnunetv2_semiseg.demo.pipeline import nnunet_env, run_step  # noqa: E402

DEFAULT_DATA = os.path.normpath(os.path.join(REPO, '..', 'shared', 'data', 'la_h5_uamt_subset'))
CASE_FOLDER = '2018LA_Seg_Training Set'
SPLIT_DIR = os.path.join(REPO, 'dataset_conversion', 'splits')
TARGET_SPACING = 2.5
SMOKE_SPACING = 5.0  # the smoke run only checks the path: smaller images, faster
CONFIGURATION = '3d_fullres'
PLANS = 'nnUNetPlans'
FOLD = 'all'
SUPERVISED_TRAINER = 'nnUNetTrainer_semisegSchedule'
DEFAULT_METHODS = ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher', 'selftrain', 'nnUNetTrainerSSNet',
                   'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerFLPM', 'nnUNetTrainerSSNetFLPM',
                   'nnUNetTrainerDualStream', 'nnUNetTrainerDualStream_releasedCode', 'nnUNetTrainerBCP']
SMOKE_METHODS = ['supervised_a', 'nnUNetTrainerMeanTeacher']
DEFAULT_SEED = 12345
MAIN_PROTOCOL = 'accuracy_la_labeled2_it300_test12'   # the evidence protocol: its figure is docs/figures/accuracy_la.png

# dataset IDs: (a) per label budget, (b), self-training union per label budget; smoke datasets separately
DATASET_IDS = {('a', 2): 951, ('b', None): 952, ('a', 1): 953, ('self', 2): 954, ('self', 1): 955,
               ('a', 'smoke'): 971, ('self', 'smoke'): 974}

SCHEDULES = {  # name -> (epochs, iterations per epoch, validation iterations per epoch); None = nnU-Net default
    'default': (20, 50, 5),
    'full': (None, None, None),
    'smoke': (1, 2, 1),
}


# ------------------------------------------------------------------------------------------------ small helpers
def log(msg: str) -> None:
    print(f'[accuracy_la {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}', flush=True)


def machine_info(device: str) -> Dict[str, str]:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = {'cpu': cpu, 'cores': str(os.cpu_count()), 'torch': torch.__version__, 'python': platform.python_version(),
            'device': device}
    try:
        import nnunetv2  # noqa: F401
        from importlib.metadata import version
        info['nnunetv2'] = version('nnunetv2')
    except Exception:
        pass
    if device == 'cuda' and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def read_ids(path: str) -> List[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def dataset_name(dataset_id: int, raw_root: str) -> str:
    found = glob.glob(os.path.join(raw_root, f'Dataset{dataset_id:03d}_*'))
    if len(found) != 1:
        raise RuntimeError(f'Expected exactly one raw folder Dataset{dataset_id:03d}_* in {raw_root}, found {found}')
    return os.path.basename(found[0])


# ----------------------------------------------------------------------------------------------------- data prep
def resample_file(src: str, dst: str, is_label: bool, spacing: float) -> None:
    """Resample to ``spacing`` mm isotropic on the same physical extent: images linear, labels by linear
    interpolation of the binary mask thresholded at 0.5 (smoother than nearest neighbour at a 4x step; the same
    for training and test labels)."""
    import SimpleITK as sitk
    img = sitk.ReadImage(src)
    size = [max(1, int(round(sz * sp / spacing))) for sz, sp in zip(img.GetSize(), img.GetSpacing())]
    # keep the physical centre of the first voxel's cell: origin shifts by half the spacing change
    origin = [o + (spacing - sp) / 2.0 * d for o, sp, d in
              zip(img.GetOrigin(), img.GetSpacing(), [img.GetDirection()[i * 4] for i in range(3)])]
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing((spacing,) * 3)
    resampler.SetSize(size)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputDirection(img.GetDirection())
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0)
    if is_label:
        out = resampler.Execute(sitk.Cast(img, sitk.sitkFloat32))
        out = sitk.Cast(out >= 0.5, sitk.sitkUInt8)
    else:
        out = resampler.Execute(sitk.Cast(img, sitk.sitkFloat32))
    sitk.WriteImage(out, dst, useCompression=True)


def prepare_raw(work: str, data: str, dataset_id: int, name: str, labeled: int, train_ids: List[str],
                test_ids: List[str], spacing: float) -> str:
    """Convert with the LA converter into a temporary root, resample into ``nnUNet_raw``; reused when present."""
    raw_root = os.path.join(work, 'nnUNet_raw')
    final = os.path.join(raw_root, f'Dataset{dataset_id:03d}_{name}')
    params = {'data': os.path.abspath(data), 'labeled': labeled, 'train': train_ids, 'test': test_ids,
              'spacing': spacing}
    marker = os.path.join(final, 'benchmark_prep.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                log(f'raw dataset {os.path.basename(final)} present, reused')
                return final
        raise RuntimeError(f'{final} was built with other settings ({marker}); use another --work folder or '
                           f'delete it')
    if os.path.exists(final):
        raise RuntimeError(f'{final} exists but is incomplete (no {marker}); delete it and rerun')
    log(f'building raw dataset {os.path.basename(final)} ({labeled} labeled, {len(train_ids) - labeled} '
        f'unlabeled, {len(test_ids)} test, {spacing} mm)')
    tmp_root = os.path.join(work, 'tmp_convert')
    shutil.rmtree(tmp_root, ignore_errors=True)
    os.makedirs(tmp_root)
    train_list, test_list = os.path.join(tmp_root, 'train.txt'), os.path.join(tmp_root, 'test.txt')
    with open(train_list, 'w') as f:
        f.write('\n'.join(train_ids) + '\n')
    with open(test_list, 'w') as f:
        f.write('\n'.join(test_ids) + '\n')
    out_root = os.path.join(tmp_root, 'raw')
    env = dict(os.environ)
    run_step(['nnUNetv2_semiseg_convert_LA', '-i', data, '-d', str(dataset_id), '--name', name, '--output', out_root,
              '--labeled', str(labeled), '--train-list', train_list, '--test-list', test_list], env,
             os.path.join(work, 'logs', 'prepare.log'))
    converted = os.path.join(out_root, f'Dataset{dataset_id:03d}_{name}')
    staging = final + '.tmp'
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for sub in sorted(os.listdir(converted)):
        src_dir = os.path.join(converted, sub)
        if not os.path.isdir(src_dir):
            shutil.copy2(src_dir, os.path.join(staging, sub))
            continue
        os.makedirs(os.path.join(staging, sub))
        for fname in sorted(os.listdir(src_dir)):
            resample_file(os.path.join(src_dir, fname), os.path.join(staging, sub, fname),
                          sub.startswith('labels'), spacing)
    with open(os.path.join(staging, 'benchmark_prep.json'), 'w') as f:
        json.dump(params, f, indent=1)
    os.makedirs(raw_root, exist_ok=True)
    os.replace(staging, final)
    shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def plan_and_preprocess(work: str, dataset_id: int, with_unlabeled: bool) -> None:
    env = nnunet_env(work)
    env.pop('nnUNet_n_proc_DA', None)  # nnU-Net 2.8.1's planner crashes with 0
    name = dataset_name(dataset_id, env['nnUNet_raw'])
    marker = os.path.join(env['nnUNet_preprocessed'], name, 'benchmark_prep_done')
    if os.path.isfile(marker):
        log(f'{name} already planned and preprocessed, reused')
        return
    log(f'planning and preprocessing {name}')
    logf = os.path.join(work, 'logs', 'prepare.log')
    run_step(['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id), '-c', CONFIGURATION, '-npfp', '1', '-np', '1',
              '--verify_dataset_integrity'], env, logf)
    if with_unlabeled:
        run_step(['nnUNetv2_semiseg_preprocess_unlabeled', '-d', str(dataset_id), '-c', CONFIGURATION, '-np', '1'],
                 env, logf)
    open(marker, 'w').close()


# --------------------------------------------------------------------------------------------------- train/eval
def schedule_env(args) -> Dict[str, str]:
    env = nnunet_env(args.work)
    epochs, iterations, val_iterations = args.schedule_values
    for var in ('nnUNet_semiseg_num_epochs', 'nnUNet_semiseg_iterations_per_epoch',
                'nnUNet_semiseg_val_iterations_per_epoch', 'nnUNet_semiseg_snapshot_epochs'):
        env.pop(var, None)
    if epochs is not None:
        env.update({'nnUNet_semiseg_num_epochs': str(epochs), 'nnUNet_semiseg_iterations_per_epoch': str(iterations),
                    'nnUNet_semiseg_val_iterations_per_epoch': str(val_iterations)})
    env.update({'nnUNet_semiseg_seed': str(args.seed), 'nnUNet_n_proc_DA': str(args.num_workers),
                'nnUNet_def_n_proc': '1', 'nnUNet_compile': 'false',
                # nnU-Net's final validation on fold 'all' predicts the training cases: its numbers are not used
                # here and on a CPU it costs minutes per run
                'nnUNet_semiseg_skip_final_validation': '1'})
    if args.snapshot_epochs:
        env['nnUNet_semiseg_snapshot_epochs'] = ','.join(str(e) for e in args.snapshot_epochs)
    return env


def model_folder(work: str, dataset_id: int, trainer: str) -> str:
    env = nnunet_env(work)
    return os.path.join(env['nnUNet_results'], dataset_name(dataset_id, env['nnUNet_raw']),
                        f'{trainer}__{PLANS}__{CONFIGURATION}', f'fold_{FOLD}')


def train(args, dataset_id: int, trainer: str, tag: str) -> Dict:
    folder = model_folder(args.work, dataset_id, trainer)
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: one training log, no stale checkpoint
    log(f'training {trainer} on Dataset{dataset_id} (fold {FOLD}); log: {folder}')
    load_before = os.getloadavg()[0]
    started = time.time()
    run_step(['nnUNetv2_train', str(dataset_id), CONFIGURATION, FOLD, '-tr', trainer, '-p', PLANS,
              '-device', args.device], schedule_env(args), os.path.join(args.work, 'logs', f'{tag}.log'))
    wall = time.time() - started
    if not os.path.isfile(os.path.join(folder, 'checkpoint_final.pth')):
        raise RuntimeError(f'training finished without {folder}/checkpoint_final.pth')
    epoch_times = []
    for log_file in sorted(glob.glob(os.path.join(folder, 'training_log_*.txt'))):
        with open(log_file) as f:
            epoch_times += [float(m) for m in re.findall(r'Epoch time: ([0-9.]+) s', f.read())]
    num_epochs = len(epoch_times)
    iterations = trainer_iterations(args, folder)
    median_epoch = statistics.median(epoch_times) if epoch_times else float('nan')
    return {'train_wall_s': wall, 'load_avg_1min': [load_before, os.getloadavg()[0]], 'epochs': num_epochs, 'iterations_per_epoch': iterations,
            'median_epoch_s': median_epoch, 's_per_iteration': median_epoch / iterations if iterations else None}


def trainer_iterations(args, folder: str) -> int:
    epochs, iterations, _ = args.schedule_values
    if iterations is not None:
        return iterations
    # nnU-Net default schedule: read it from the log's debug.json
    debug = os.path.join(folder, 'debug.json')
    if os.path.isfile(debug):
        with open(debug) as f:
            return int(json.load(f).get('num_iterations_per_epoch', 250))
    return 250


def predict_and_evaluate(args, dataset_id: int, trainer: str, raw_a: str, tag: str,
                         checkpoint: str = 'checkpoint_final.pth') -> Dict:
    from nnunetv2_semiseg.evaluation.evaluate import evaluate_folders
    out = os.path.join(args.work, 'predictions', args.results_tag, tag)
    shutil.rmtree(out, ignore_errors=True)
    command = ['nnUNetv2_predict', '-i', os.path.join(raw_a, 'imagesTs'), '-o', out, '-d', str(dataset_id),
               '-c', CONFIGURATION, '-f', FOLD, '-tr', trainer, '-p', PLANS, '-chk', checkpoint,
               '-device', args.device, '-npp', '1', '-nps', '1']
    if args.disable_tta:
        command.append('--disable_tta')
    started = time.time()
    run_step(command, schedule_env(args), os.path.join(args.work, 'logs', f'{tag}.log'))
    predict_s = time.time() - started
    ref = os.path.join(raw_a, 'labelsTs')
    plain = evaluate_folders(ref, out, labels=[1])
    lcc = evaluate_folders(ref, out, labels=[1], lcc=True)
    row = {'metrics': {k: float(v) for k, v in plain['foreground_mean'].items()},
           'metrics_lcc': {k: float(v) for k, v in lcc['foreground_mean'].items()},
           'per_case_dice': {c['case']: float(c['metrics']['1']['dice']) for c in plain['per_case']},
           'per_case_hd95_voxel': {c['case']: float(c['metrics']['1']['hd95_voxel']) for c in plain['per_case']},
           'test_cases': sorted(c['case'] for c in plain['per_case']),
           'predict_s': predict_s, 'num_test': len([f for f in os.listdir(ref) if f.endswith('.nii.gz')])}
    return row


# ------------------------------------------------------------------------------------------------------- methods
def run_method(args, method: str, ids: Dict[str, int], raw: Dict[str, str], results: Dict) -> Dict:
    row = {'method': method, 'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
           'machine': machine_info(args.device), 'schedule': list(args.schedule_values), 'seed': args.seed,
           'num_workers_DA': args.num_workers, 'tta': not args.disable_tta}
    if method in ('supervised_a', 'supervised_b'):
        arm = method[-1]
        dataset_id, trainer = ids[arm], SUPERVISED_TRAINER
        row.update(trainer=trainer, dataset=os.path.basename(raw[arm]))
        row.update(train(args, dataset_id, trainer, method))
    elif method == 'selftrain':
        teacher_ckpt = os.path.join(model_folder(args.work, ids['a'], SUPERVISED_TRAINER), 'checkpoint_final.pth')
        if not os.path.isfile(teacher_ckpt) or 'supervised_a' not in results['methods']:
            log('selftrain needs the supervised_a model: running supervised_a first')
            merge_row(args, results, run_method(args, 'supervised_a', ids, raw, results))
        union_raw = pseudolabel(args, ids)
        raw['self'] = union_raw
        plan_and_preprocess(args.work, ids['self'], with_unlabeled=False)
        dataset_id, trainer = ids['self'], SUPERVISED_TRAINER
        row.update(trainer=trainer, dataset=os.path.basename(union_raw),
                   teacher='supervised_a', teacher_train_wall_s=results['methods']['supervised_a']['train_wall_s'],
                   pseudolabel_s=args._pseudolabel_s)
        row.update(train(args, dataset_id, trainer, method))
    else:
        dataset_id, trainer = ids['a'], method
        row.update(trainer=trainer, dataset=os.path.basename(raw['a']))
        row.update(train(args, dataset_id, trainer, method))
    row.update(predict_and_evaluate(args, dataset_id, trainer, raw['a'], method))
    if args.snapshot_epochs:
        row['snapshots'] = snapshot_rows(args, dataset_id, trainer, raw['a'], method)
    m = row['metrics']
    log(f'{method}: Dice {m["dice"]:.4f}, Jaccard {m["jaccard"]:.4f}, 95HD {m["hd95_voxel"]:.2f} vox, '
        f'ASD {m["asd_voxel"]:.2f} vox, train {row["train_wall_s"]:.0f} s, {row["s_per_iteration"]:.3f} s/it')
    return row


def snapshot_rows(args, dataset_id: int, trainer: str, raw_a: str, method: str) -> Dict[str, Dict]:
    """The learning curve: the test cases predicted with each checkpoint_epoch<N>.pth of the run, keyed by the
    iterations done (the schedule study: where a model stops improving on the test cases)."""
    folder = model_folder(args.work, dataset_id, trainer)
    iterations = trainer_iterations(args, folder)
    curve = {}
    for epoch in args.snapshot_epochs:
        checkpoint = f'checkpoint_epoch{epoch}.pth'
        if not os.path.isfile(os.path.join(folder, checkpoint)):
            raise RuntimeError(f'{method}: {checkpoint} was not written (is epoch {epoch} within the schedule?)')
        row = predict_and_evaluate(args, dataset_id, trainer, raw_a, f'{method}_epoch{epoch}', checkpoint)
        row['epoch'] = epoch
        curve[str(epoch * iterations)] = row
        log(f'{method} after {epoch * iterations} iterations: Dice {row["metrics"]["dice"]:.4f}')
    return curve


def pseudolabel(args, ids: Dict[str, int]) -> str:
    env = schedule_env(args)
    union_name = dataset_name_or_none(ids['self'], env['nnUNet_raw'])
    started = time.time()
    if union_name is not None:  # a previous run's union: rebuilt from the current teacher
        shutil.rmtree(os.path.join(env['nnUNet_raw'], union_name))
        shutil.rmtree(os.path.join(env['nnUNet_preprocessed'], union_name), ignore_errors=True)
        shutil.rmtree(os.path.join(env['nnUNet_results'], union_name), ignore_errors=True)
    log(f'pseudo-labelling the unlabeled cases of Dataset{ids["a"]} -> Dataset{ids["self"]}')
    run_step(['nnUNetv2_semiseg_pseudolabel', '-d', str(ids['a']), '-c', CONFIGURATION, '-tr', SUPERVISED_TRAINER,
              '-f', FOLD, '-o', str(ids['self']), '-p', PLANS, '-device', args.device, '-npp', '1', '-nps', '1'], env,
             os.path.join(args.work, 'logs', 'selftrain.log'))
    args._pseudolabel_s = time.time() - started
    return os.path.join(env['nnUNet_raw'], dataset_name(ids['self'], env['nnUNet_raw']))


def dataset_name_or_none(dataset_id: int, raw_root: str) -> Optional[str]:
    found = glob.glob(os.path.join(raw_root, f'Dataset{dataset_id:03d}_*'))
    return os.path.basename(found[0]) if found else None


# -------------------------------------------------------------------------------------------------------- output
def load_results(path: str) -> Dict:
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {'methods': {}}


def merge_row(args, results: Dict, row: Dict) -> None:
    """Merge one method's row into the results JSON (re-read under a lock: methods may run in parallel calls)
    and regenerate the markdown section."""
    import fcntl
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(os.path.join(args.work, 'results.lock'), 'w') as lock:  # parallel calls share --work
        fcntl.flock(lock, fcntl.LOCK_EX)
        fresh = load_results(args.results)
        fresh['methods'][row['method']] = row
        fresh['settings'] = settings(args)
        tmp = args.results + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(fresh, f, indent=1, sort_keys=True)
        os.replace(tmp, args.results)
        results.clear()
        results.update(fresh)
        render(args, results)
        render_summary(args)


def summary_figure_path(args) -> str:
    if args.smoke:
        return os.path.join(args.work, 'accuracy_la_smoke.png')
    name = 'accuracy_la' if args.results_base == MAIN_PROTOCOL else args.results_base
    return os.path.join(REPO, 'docs', 'figures', name + '.png')


def render_summary(args) -> None:
    """The across-seed section (paired statistics) and its figure, from every seed's JSON of this protocol."""
    import accuracy_report
    s = settings(args)
    epochs, iterations = s['epochs'], s['iterations_per_epoch']
    length = f'{epochs * iterations} iterations' if epochs else "nnU-Net's full schedule"
    title = (f'Accuracy on real LA data across seeds: {s["labeled"]} labeled, {s["device"].upper()}, {length}, '
             f'{s["num_test"]} test cases')
    description = (f'Every seed of this protocol (`{args.results_base}*.json`), {s["num_train"]} training cases '
                   f'({s["labeled"]} labeled for (a), all for supervised_b), {s["num_test"]} test cases, '
                   f'{s["spacing_mm"]} mm; per-seed tables below.')
    data = accuracy_report.update(os.path.dirname(args.results), os.path.basename(args.results_base)
                                  if not args.smoke else 'accuracy_la_smoke', DEFAULT_SEED, args.markdown,
                                  args.summary_key, summary_figure_path(args), title, description)
    if data['dice']:
        log(f'across-seed summary written to {args.markdown} (section {args.summary_key}), figure '
            f'{summary_figure_path(args)}')


def settings(args) -> Dict:
    epochs, iterations, val_iterations = args.schedule_values
    return {'labeled': args.labeled_label, 'spacing_mm': args.spacing, 'schedule': args.schedule,
            'epochs': epochs, 'iterations_per_epoch': iterations, 'val_iterations_per_epoch': val_iterations,
            'seed': args.seed, 'device': args.device, 'num_workers_DA': args.num_workers,
            'tta': not args.disable_tta, 'data': os.path.relpath(args.data, REPO),
            'num_train': getattr(args, 'num_train', None), 'num_test': getattr(args, 'num_test', None)}


def _fmt(value, digits=2, scale=1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return 'n/a'
    return f'{value * scale:.{digits}f}'


def schedule_flags(s: Dict) -> str:
    if s['schedule'] == 'full':
        return ' --schedule full'
    if s['schedule'] not in ('default', 'smoke'):
        return f' --epochs {s["epochs"]} --iterations-per-epoch {s["iterations_per_epoch"]} ' \
               f'--val-iterations {s["val_iterations_per_epoch"]}'
    return ''


def render(args, results: Dict) -> None:
    rows = results['methods']
    s = results.get('settings') or settings(args)
    a, b = rows.get('supervised_a'), rows.get('supervised_b')
    order = [m for m in DEFAULT_METHODS if m in rows] + sorted(m for m in rows if m not in DEFAULT_METHODS)
    epochs, iterations = s['epochs'], s['iterations_per_epoch']
    length = f'{epochs * iterations} iterations' if epochs else "nnU-Net's full schedule"
    total = f'{length} ({epochs} epochs x {iterations})' if epochs else f'{length} (1000 epochs x 250 iterations)'
    seed_flag = f' --seed {s["seed"]}' if s['seed'] != DEFAULT_SEED else ''
    lines = [f'### Accuracy on real LA data: {s["labeled"]} labeled cases, {s["device"].upper()}, {length}'
             + (f', seed {s["seed"]}' if seed_flag else ''), '',
             f'`benchmarks/accuracy_la.py` ({s["data"]}: every training and test ID of the UA-MT split present '
             f'in the subset; here {s.get("num_train") or 20} training and {s.get("num_test") or 4} test cases), '
             f'converted with `nnUNetv2_semiseg_convert_LA` and resampled to {s["spacing_mm"]} mm '
             f'isotropic. (a) = {s["labeled"]} labeled + the other training cases unlabeled, (b) = all training '
             f'cases labeled (the upper bound); the same test cases for all. Stock `nnUNetv2_plan_and_preprocess` (`3d_fullres`, `nnUNetPlans`), '
             f'fold `all`, {total}, {s["val_iterations_per_epoch"] or 50} validation iterations per epoch, seed '
             f'{s["seed"]} (`nnUNet_semiseg_seed`), `nnUNet_n_proc_DA={s["num_workers_DA"]}`, prediction of the '
             f'test cases with `checkpoint_final.pth` {"with" if s["tta"] else "without"} mirroring TTA. '
             f'Results JSON: `{os.path.relpath(args.results, REPO)}`.', '',
             '| method | trainer | training data | Dice % | Jaccard % | 95HD vox (mm) | ASD vox (mm) | '
             'Dice % LCC | gap closed | train wall | s/it | load avg | measured |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    if not rows:
        lines[-2:] = ['No results on this schedule yet.']
    for name in order:
        r = rows[name]
        m, ml = r['metrics'], r['metrics_lcc']
        gap = None
        if a and b and name not in ('supervised_a', 'supervised_b'):
            denom = b['metrics']['dice'] - a['metrics']['dice']
            gap = (m['dice'] - a['metrics']['dice']) / denom if denom > 0 else None
        gap_text = f'{gap * 100:.0f} %' if gap is not None else ('0 % (ref.)' if name == 'supervised_a' else
                                                                  '100 % (ref.)' if name == 'supervised_b' and a
                                                                  else 'n/a')
        lines.append(
            f'| {name} | `{r["trainer"]}` | {r["dataset"]} | {_fmt(m["dice"], 2, 100)} | '
            f'{_fmt(m["jaccard"], 2, 100)} | {_fmt(m["hd95_voxel"])} ({_fmt(m["hd95_mm"], 1)}) | '
            f'{_fmt(m["asd_voxel"])} ({_fmt(m["asd_mm"], 1)}) | {_fmt(ml["dice"], 2, 100)} | {gap_text} | '
            f'{r["train_wall_s"] / 60:.1f} min | {_fmt(r["s_per_iteration"], 3)} | '
            f'{"/".join(f"{x:.1f}" for x in r.get("load_avg_1min", [])) or "n/a"} | {r["date"]} |')
    machines = sorted({f'{r["machine"]["cpu"]}, {r["machine"]["cores"]} cores' +
                       (f', {r["machine"]["gpu"]}' if r['machine'].get('gpu') else '') +
                       f', torch {r["machine"]["torch"]}, nnunetv2 {r["machine"].get("nnunetv2", "?")}'
                       for r in rows.values()})
    lines += ['', f'Machine: {"; ".join(machines) or "n/a (nothing measured yet)"}. Train wall = the whole `nnUNetv2_train` command (start-up, '
                  f'training, nnU-Net\'s final validation, which on fold `all` predicts the training cases); s/it = '
                  f'median epoch time of the training log / iterations per epoch (includes the few validation '
                  f'iterations of each epoch). Gap closed = (Dice - Dice supervised_a) / (Dice supervised_b - Dice '
                  f'supervised_a). Distances in voxels of the 2.5 mm grid (mm in brackets; not comparable with the '
                  f"papers' voxel numbers on the 0.625 mm grid). LCC = largest connected component kept (SS-Net/BCP "
                  f'protocol); the main columns are without it. Load avg = the machine\'s 1-minute load average '
                  f'before/after training (the box is shared: a load above the core count slows every run and '
                  f'inflates the times).']
    extra = [f'`selftrain`: teacher = the `supervised_a` model ({rows["selftrain"]["teacher_train_wall_s"] / 60:.1f} '
             f'min), pseudo-labelling {rows["selftrain"]["pseudolabel_s"] / 60:.1f} min, plus planning the union; '
             f'train wall is the student only.'] if 'selftrain' in rows else []
    missing = [m for m in DEFAULT_METHODS if m not in rows]
    if missing:
        extra.append('Not yet measured: ' + ', '.join(
            f'`{m}` (run `python benchmarks/accuracy_la.py --method {m}'
            f'{" --labeled 1" if s["labeled"] == 1 else ""}{schedule_flags(s)}{seed_flag}`)'
            for m in missing) + '.')
    extra += results.get('notes', [])
    for paragraph in extra:
        lines += ['', paragraph]
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    replace_section(args.markdown, args.section_key, '\n'.join(lines))
    log(f'table written to {args.markdown} (section {args.section_key})')


# ---------------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', nargs='+', default=None,
                   help=f'methods to run, in order (default: {" ".join(DEFAULT_METHODS)}; smoke: '
                        f'{" ".join(SMOKE_METHODS)})')
    p.add_argument('--labeled', type=int, default=2, choices=(1, 2), help='labeled cases in (a)')
    p.add_argument('--schedule', choices=('default', 'full'), default='default',
                   help='default: 20 epochs x 50 iterations (1000), 5 validation iterations; full: nnU-Net\'s '
                        '1000 x 250 (for a GPU)')
    p.add_argument('--epochs', type=int, default=None,
                   help='custom schedule: epochs (with --iterations-per-epoch; results go to their own JSON and '
                        'markdown section, tagged with the total iterations)')
    p.add_argument('--iterations-per-epoch', dest='iterations_per_epoch', type=int, default=None)
    p.add_argument('--val-iterations', dest='val_iterations', type=int, default=None,
                   help='validation iterations per epoch for a custom schedule (default 5)')
    p.add_argument('--data', default=DEFAULT_DATA, help='the LA h5 subset (default: ../shared/data/la_h5_uamt_subset)')
    p.add_argument('--work', default=None, help='working folder, reused across calls (default: '
                                                '<tmp>/semiseg_accuracy_la, smoke: <tmp>/semiseg_accuracy_la_smoke)')
    p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    p.add_argument('--seed', type=int, default=DEFAULT_SEED,
                   help='nnUNet_semiseg_seed for every run (a seed other than the default gets its own results JSON '
                        'and markdown section)')
    p.add_argument('--num-workers', dest='num_workers', type=int, default=0,
                   help='nnUNet_n_proc_DA for training (0 = in-process augmentation, reproducible with the seed)')
    p.add_argument('--snapshot-epochs', dest='snapshot_epochs', default=None,
                   type=lambda v: sorted({int(e) for e in v.split(',')}),
                   help='comma-separated epoch counts (e.g. 15,25,35): also predict the test cases with the '
                        'checkpoints after these epochs (nnUNet_semiseg_snapshot_epochs), stored as the row\'s '
                        'learning curve; epochs must be below the schedule\'s last')
    p.add_argument('--disable-tta', dest='disable_tta', action='store_true', help='predict without mirroring')
    p.add_argument('--results', default=None, help='results JSON (default: benchmarks/results/accuracy_la_*.json; '
                                                   'smoke: in the work folder)')
    p.add_argument('--markdown', default=None, help='markdown file (default: docs/benchmarks.md; smoke: in the work '
                                                    'folder)')
    p.add_argument('--note', default=None,
                   help='with --render-only: store this note in the results JSON (shown under the table); '
                        '"" clears the notes')
    p.add_argument('--render-only', dest='render_only', action='store_true',
                   help='only rebuild the markdown table from the results JSON')
    p.add_argument('--smoke', action='store_true', help='a few iterations on 2 labeled + 2 unlabeled + 1 test case')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.data = os.path.abspath(args.data)
    if args.smoke:
        args.schedule = 'smoke'
        args.disable_tta = True
    if args.epochs is not None or args.iterations_per_epoch is not None:
        if args.epochs is None or args.iterations_per_epoch is None or args.smoke:
            raise SystemExit('--epochs and --iterations-per-epoch go together (and not with --smoke)')
        args.schedule = f'it{args.epochs * args.iterations_per_epoch}'
        SCHEDULES[args.schedule] = (args.epochs, args.iterations_per_epoch, args.val_iterations or 5)
    args.schedule_values = SCHEDULES[args.schedule]
    if args.snapshot_epochs and (min(args.snapshot_epochs) < 1 or args.schedule_values[0] is None
                                 or max(args.snapshot_epochs) >= args.schedule_values[0]):
        raise SystemExit(f'--snapshot-epochs {args.snapshot_epochs}: each must be between 1 and the schedule\'s '
                         f'epochs - 1 ({args.schedule_values[0]}); the last epoch is checkpoint_final.pth')
    args.spacing = SMOKE_SPACING if args.smoke else TARGET_SPACING
    args.labeled_label = args.labeled
    case_root = os.path.join(args.data, CASE_FOLDER)
    if not os.path.isdir(case_root):
        print(f'LA data not found: {case_root} does not exist (pass --data, the folder containing '
              f"'{CASE_FOLDER}/')", file=sys.stderr)
        return 2
    present = set(os.listdir(case_root))
    train_ids = [c for c in read_ids(os.path.join(SPLIT_DIR, 'la_train.txt')) if c in present]
    test_ids = [c for c in read_ids(os.path.join(SPLIT_DIR, 'la_test.txt')) if c in present]
    if args.smoke:
        train_ids, test_ids = train_ids[:4], test_ids[:1]
    args.num_train, args.num_test = len(train_ids), len(test_ids)
    tag = 'smoke' if args.smoke else f'labeled{args.labeled}' + ('' if args.schedule == 'default' else
                                                                 f'_{args.schedule}')
    if not args.smoke and args.num_test != 4:  # the 12-case protocol: own files, the 4-case tables stay as they were
        tag += f'_test{args.num_test}'
    base_tag = tag
    if not args.smoke and args.seed != DEFAULT_SEED:  # another seed = its own JSON and table (seed-to-seed spread)
        tag += f'_seed{args.seed}'
    args.results_tag = tag
    # every seed's JSON of one protocol shares this base name; accuracy_report.py summarises them together
    args.results_base = f'accuracy_la_{base_tag}' + ('' if args.device == 'cpu' else f'_{args.device}')
    args.summary_key = f'accuracy_la:summary:{args.device}:{base_tag.replace("_", ":")}'
    args.section_key = f'accuracy_la:{args.device}:{tag.replace("_", ":")}'
    if args.work is None:
        args.work = os.path.join(tempfile.gettempdir(), 'semiseg_accuracy_la' + ('_smoke' if args.smoke else ''))
    args.work = os.path.abspath(args.work)
    if args.results is None:
        args.results = os.path.join(args.work, 'results', 'accuracy_la_smoke.json') if args.smoke else \
            os.path.join(SCRIPT_DIR, 'results', args.results_base +
                         ('' if args.seed == DEFAULT_SEED else f'_seed{args.seed}') + '.json')
    if args.markdown is None:
        args.markdown = os.path.join(args.work, 'benchmarks_smoke.md') if args.smoke else \
            os.path.join(REPO, 'docs', 'benchmarks.md')
    results = load_results(args.results)
    if args.render_only:
        if args.note is not None:
            results['notes'] = [args.note] if args.note else []
            results.setdefault('settings', settings(args))
            os.makedirs(os.path.dirname(args.results), exist_ok=True)
            with open(args.results, 'w') as f:
                json.dump(results, f, indent=1, sort_keys=True)
        render(args, results)
        render_summary(args)
        return 0
    methods = args.method or (SMOKE_METHODS if args.smoke else DEFAULT_METHODS)

    os.makedirs(os.path.join(args.work, 'logs'), exist_ok=True)
    log(f'work folder {args.work}; {len(train_ids)} training and {len(test_ids)} test cases; methods {methods}')

    budget = 'smoke' if args.smoke else args.labeled
    ids = {'a': DATASET_IDS[('a', budget)], 'self': DATASET_IDS[('self', budget)], 'b': DATASET_IDS[('b', None)]}
    raw = {'a': prepare_raw(args.work, args.data, ids['a'], f'LA25mm_L{args.labeled}' if not args.smoke else 'LA5mm_smoke',
                            args.labeled, train_ids, test_ids, args.spacing)}
    plan_and_preprocess(args.work, ids['a'], with_unlabeled=True)
    if 'supervised_b' in methods:
        raw['b'] = prepare_raw(args.work, args.data, ids['b'], f'LA25mm_L{len(train_ids)}', len(train_ids),
                               train_ids, test_ids, args.spacing)
        plan_and_preprocess(args.work, ids['b'], with_unlabeled=False)
    for method in methods:
        log(f'=== {method} ===')
        merge_row(args, results, run_method(args, method, ids, raw, results))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
