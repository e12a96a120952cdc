"""What the accuracy benchmarks share, whatever the dataset: building the (a) / (b) / self-training datasets through
the stock CLIs, running a method with a seed and a schedule, predicting the test cases, scoring them, writing the
results JSON and the markdown tables, snapshots (learning curves) and label draws.

A dataset is described by a :class:`DatasetSpec` (``accuracy_la.LA``, ``accuracy_acdc.ACDC``): where its data
are, how a raw nnU-Net dataset is built from them, which configuration is trained, how the test cases are scored
and how its tables read. ``benchmarks/accuracy.py --dataset la|acdc`` is the command; ``accuracy_la.py`` and
``accuracy_acdc.py`` run their dataset directly.

Label draws (``--labeled-draw K``): the labeled cases of draw K are the K-th block of ``--labeled`` consecutive
entries of the training list, in the published list's order (draw 0 = the first cases, the literature's
convention and every earlier result; draw 1 = the next block, ...; blocks never overlap). The other training
cases stay the unlabeled pool; the test cases never change. A draw other than 0 gets its own datasets, results
JSON (``..._draw<K>[_seed<S>].json``) and table; the across-seed summary pairs rows by (draw, seed, test case).
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
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(SCRIPT_DIR)
if SCRIPT_DIR not in sys.path:
    sys.path.insert(0, SCRIPT_DIR)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from iteration_cost import replace_section  # noqa: E402  (the markdown section writer)

from nnunetv2_semiseg.demo.pipeline import nnunet_env, run_step  # noqa: E402
from nnunetv2_semiseg.trainers.schedule import SWITCH_CHECKPOINT, SWITCH_CHECKPOINT_ENV_VAR  # noqa: E402

SPLIT_DIR = os.path.join(REPO, 'dataset_conversion', 'splits')
PLANS = 'nnUNetPlans'
FOLD = 'all'
SUPERVISED_TRAINER = 'nnUNetTrainer_semisegSchedule'
DEFAULT_SEED = 12345
SCHEDULES = {  # name -> (epochs, iterations per epoch, validation iterations per epoch); None = nnU-Net default
    'default': (20, 50, 5),
    'full': (None, None, None),
    'smoke': (1, 2, 1),
}


@dataclass
class DatasetSpec:
    """One benchmark dataset. Callables get the parsed ``args`` (see :func:`build_parser`)."""
    key: str                        # 'la' | 'acdc': the --dataset value
    prefix: str                     # results / section / figure names start with this ('accuracy_la')
    display: str                    # 'LA' (table titles)
    configuration: str              # nnU-Net configuration trained
    default_data: Callable[[], str]
    data_check: Callable[[str], Optional[str]]          # data folder -> error message or None
    case_ids: Callable[[object], Tuple[List[str], List[str]]]   # args -> (training list, test list), present only
    prepare_raw: Callable[..., str]                     # (args, dataset_id, name, labeled_ids, train, test)
    raw_name: Callable[[object, str], str]              # (args, arm 'a'|'b') -> raw dataset name part
    score: Callable[[str, str], Dict]                   # (reference folder, prediction folder) -> row fields
    dataset_ids: Dict
    default_methods: List[str]
    smoke_methods: List[str]
    main_protocol: str
    labeled_choices: Tuple[int, ...]
    default_labeled: int
    protocol_tag: Callable[[object], str]               # args -> results tag before draw/seed suffixes
    table_title: Callable[[Dict], str]
    table_description: Callable[[object, Dict], str]
    table_columns: List[Tuple[str, Callable[[Dict], str]]]   # (header, row -> cell) between dataset and gap
    table_footer: Callable[[Dict], str]
    summary_title: Callable[[Dict], str]
    summary_description: Callable[[object, Dict], str]
    extra_sections: Callable[[object, Dict], None] = field(default=lambda args, results: None)
    # (args, ids, arm) after planning a dataset, before preprocessing; e.g. ACDC's upper bound takes (a)'s batch
    adjust_plans: Callable[[object, Dict, str], None] = field(default=lambda args, ids, arm: None)
    unit: str = 'case'              # what a test case is called in the tables ('case', 'volume')


# ------------------------------------------------------------------------------------------------ small helpers
def log(args, msg: str) -> None:
    print(f'[{args.spec.prefix} {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}', flush=True)


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


def dataset_name_or_none(dataset_id: int, raw_root: str) -> Optional[str]:
    found = glob.glob(os.path.join(raw_root, f'Dataset{dataset_id:03d}_*'))
    return os.path.basename(found[0]) if found else None


def draw_labeled(train_ids: Sequence[str], labeled: int, draw: int) -> List[str]:
    """The labeled cases of label draw ``draw``: the draw-th block of ``labeled`` consecutive training-list entries
    (draw 0 = the first ``labeled``). Raises when the list is too short for disjoint blocks."""
    if draw < 0:
        raise ValueError(f'--labeled-draw must be >= 0, got {draw}')
    start, stop = draw * labeled, (draw + 1) * labeled
    if stop > len(train_ids) - 1:  # at least one unlabeled case must remain
        raise ValueError(f'label draw {draw} needs training-list entries {start + 1}-{stop} and one unlabeled case; '
                         f'the list has {len(train_ids)}: choose a draw below {(len(train_ids) - 1) // labeled}')
    return list(train_ids[start:stop])


def raw_params_marker(final: str, params: Dict) -> Optional[str]:
    """The raw dataset at ``final`` if it was built with ``params`` (reused), None if absent; raises otherwise."""
    marker = os.path.join(final, 'benchmark_prep.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == params:
                return final
        raise RuntimeError(f'{final} was built with other settings ({marker}); use another --work folder or '
                           f'delete it')
    if os.path.exists(final):
        raise RuntimeError(f'{final} exists but is incomplete (no {marker}); delete it and rerun')
    return None


def write_lists(folder: str, **lists: Sequence[str]) -> Dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, ids in lists.items():
        paths[name] = os.path.join(folder, f'{name}.txt')
        with open(paths[name], 'w') as f:
            f.write('\n'.join(ids) + '\n')
    return paths


# ----------------------------------------------------------------------------------------------------- data prep
def target_spacing_args(spacing_xyz: Optional[Sequence[Optional[float]]]) -> List[str]:
    """The converters' ``--target-spacing`` for ``spacing_xyz`` (None for an axis: keep it; None: no resampling)."""
    if spacing_xyz is None:
        return []
    return ['--target-spacing', *('keep' if v is None else f'{v:g}' for v in spacing_xyz)]


def install_converted(converted: str, final: str, params: Dict) -> str:
    """Move a dataset the converter wrote (already at the benchmark's spacing) to ``final`` with the build
    parameters as ``benchmark_prep.json`` (the reuse marker)."""
    with open(os.path.join(converted, 'benchmark_prep.json'), 'w') as f:
        json.dump(params, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(converted, final)
    return final


def plans_file(args, dataset_id: int) -> str:
    env = nnunet_env(args.work)
    return os.path.join(env['nnUNet_preprocessed'], dataset_name(dataset_id, env['nnUNet_raw']), f'{PLANS}.json')


def plan_and_preprocess(args, dataset_id: int, with_unlabeled: bool, ids: Optional[Dict] = None,
                        arm: Optional[str] = None) -> None:
    env = nnunet_env(args.work)
    env.pop('nnUNet_n_proc_DA', None)  # nnU-Net 2.8.1's planner crashes with 0
    name = dataset_name(dataset_id, env['nnUNet_raw'])
    marker = os.path.join(env['nnUNet_preprocessed'], name, 'benchmark_prep_done')
    if os.path.isfile(marker):
        log(args, f'{name} already planned and preprocessed, reused')
        if arm is not None:
            args.spec.adjust_plans(args, ids, arm)  # records what was adjusted when it was built
        return
    log(args, f'planning and preprocessing {name}')
    logf = os.path.join(args.work, 'logs', 'prepare.log')
    configuration = args.spec.configuration
    run_step(['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id), '-c', configuration, '-npfp', '1', '-np', '1',
              '--verify_dataset_integrity', '--no_pp'], env, logf)
    if arm is not None:
        args.spec.adjust_plans(args, ids, arm)  # the batch size does not change preprocessing: adjust in between
    run_step(['nnUNetv2_preprocess', '-d', str(dataset_id), '-c', configuration, '-np', '1'], env, logf)
    if with_unlabeled:
        run_step(['nnUNetv2_semiseg_preprocess_unlabeled', '-d', str(dataset_id), '-c', configuration, '-np', '1'],
                 env, logf)
    open(marker, 'w').close()


# --------------------------------------------------------------------------------------------------- train/eval
def schedule_env(args) -> Dict[str, str]:
    env = nnunet_env(args.work)
    epochs, iterations, val_iterations = args.schedule_values
    for var in ('nnUNet_semiseg_num_epochs', 'nnUNet_semiseg_iterations_per_epoch',
                'nnUNet_semiseg_val_iterations_per_epoch', 'nnUNet_semiseg_snapshot_epochs',
                SWITCH_CHECKPOINT_ENV_VAR):
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
    if getattr(args, 'switch_diagnostic', False):
        env[SWITCH_CHECKPOINT_ENV_VAR] = '1'
    return env


RUN_MARKER = 'benchmark_run.json'   # what a model folder's checkpoint was trained with (seed, schedule, draw)


def run_identity(args) -> Dict:
    return {'seed': args.seed, 'schedule': list(args.schedule_values), 'labeled_draw': args.labeled_draw}


def trained_with_this_run(args, folder: str) -> bool:
    """True if ``folder``'s checkpoint_final.pth came from a training with this call's seed, schedule and draw.
    One model folder serves every seed and schedule of a work folder, so selftrain must not take a teacher that
    another seed (or the 1000-iteration schedule) left there."""
    marker = os.path.join(folder, RUN_MARKER)
    if not (os.path.isfile(os.path.join(folder, 'checkpoint_final.pth')) and os.path.isfile(marker)):
        return False
    with open(marker) as f:
        return json.load(f) == run_identity(args)


def write_json_atomically(path: str, content) -> None:
    with open(path + '.tmp', 'w') as f:
        json.dump(content, f, indent=1)
    os.replace(path + '.tmp', path)


def model_folder(args, dataset_id: int, trainer: str) -> str:
    env = nnunet_env(args.work)
    return os.path.join(env['nnUNet_results'], dataset_name(dataset_id, env['nnUNet_raw']),
                        f'{trainer}__{PLANS}__{args.spec.configuration}', f'fold_{FOLD}')


def train(args, dataset_id: int, trainer: str, tag: str) -> Dict:
    folder = model_folder(args, dataset_id, trainer)
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: one training log, no stale checkpoint
    log(args, f'training {trainer} on Dataset{dataset_id} (fold {FOLD}); log: {folder}')
    load_before = os.getloadavg()[0]
    started = time.time()
    run_step(['nnUNetv2_train', str(dataset_id), args.spec.configuration, FOLD, '-tr', trainer, '-p', PLANS,
              '-device', args.device], schedule_env(args), os.path.join(args.work, 'logs', f'{tag}.log'))
    wall = time.time() - started
    if not os.path.isfile(os.path.join(folder, 'checkpoint_final.pth')):
        raise RuntimeError(f'training finished without {folder}/checkpoint_final.pth')
    write_json_atomically(os.path.join(folder, RUN_MARKER), run_identity(args))
    epoch_times = []
    for log_file in sorted(glob.glob(os.path.join(folder, 'training_log_*.txt'))):
        with open(log_file) as f:
            epoch_times += [float(m) for m in re.findall(r'Epoch time: ([0-9.]+) s', f.read())]
    num_epochs = len(epoch_times)
    iterations = trainer_iterations(args, folder)
    median_epoch = statistics.median(epoch_times) if epoch_times else float('nan')
    with open(plans_file(args, dataset_id)) as f:  # per row: a later run's settings would not keep it (ACDC adjusts it)
        batch = json.load(f)['configurations'][args.spec.configuration]['batch_size']
    return {'train_wall_s': wall, 'batch_size': batch, 'load_avg_1min': [load_before, os.getloadavg()[0]],
            'epochs': num_epochs, 'iterations_per_epoch': iterations, 'median_epoch_s': median_epoch,
            's_per_iteration': median_epoch / iterations if iterations else None}


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
    out = os.path.join(args.work, 'predictions', args.results_tag, tag)
    shutil.rmtree(out, ignore_errors=True)
    command = ['nnUNetv2_predict', '-i', os.path.join(raw_a, 'imagesTs'), '-o', out, '-d', str(dataset_id),
               '-c', args.spec.configuration, '-f', FOLD, '-tr', trainer, '-p', PLANS, '-chk', checkpoint,
               '-device', args.device, '-npp', '1', '-nps', '1']
    if args.disable_tta:
        command.append('--disable_tta')
    started = time.time()
    run_step(command, schedule_env(args), os.path.join(args.work, 'logs', f'{tag}.log'))
    predict_s = time.time() - started
    ref = os.path.join(raw_a, 'labelsTs')
    row = args.spec.score(ref, out)
    row.update(predict_s=predict_s, num_test=len([f for f in os.listdir(ref) if f.endswith('.nii.gz')]))
    return row


# ------------------------------------------------------------------------------------------------------- methods
def run_method(args, method: str, ids: Dict[str, int], raw: Dict[str, str], results: Dict) -> Dict:
    row = {'method': method, 'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
           'machine': machine_info(args.device), 'schedule': list(args.schedule_values), 'seed': args.seed,
           'num_workers_DA': args.num_workers, 'tta': not args.disable_tta}
    if args.labeled_draw:
        row.update(labeled_draw=args.labeled_draw, labeled_cases=list(args.labeled_ids))
    if method in ('supervised_a', 'supervised_b'):
        arm = method[-1]
        dataset_id, trainer = ids[arm], SUPERVISED_TRAINER
        row.update(trainer=trainer, dataset=os.path.basename(raw[arm]))
        row.update(train(args, dataset_id, trainer, method))
    elif method == 'selftrain':
        if (not trained_with_this_run(args, model_folder(args, ids['a'], SUPERVISED_TRAINER))
                or 'supervised_a' not in results['methods']):
            log(args, 'selftrain needs the supervised_a model of this seed, schedule and draw: running supervised_a '
                      'first')
            teacher = run_method(args, 'supervised_a', ids, raw, results)
            if 'supervised_a' in results['methods']:
                # A rerun need not reproduce the earlier row (the code may have changed since); the earlier row stays
                # the reference every other row was compared against, and the teacher's own scores go here.
                log(args, 'supervised_a keeps its earlier row (the reference of every comparison); the retrained '
                          'teacher\'s scores are stored in the selftrain row as teacher_run')
                row['teacher_run'] = run_scores(teacher)
            else:
                merge_row(args, results, teacher)
        union_raw = pseudolabel(args, ids)
        raw['self'] = union_raw
        plan_and_preprocess(args, ids['self'], with_unlabeled=False, ids=ids, arm='self')
        dataset_id, trainer = ids['self'], SUPERVISED_TRAINER
        teacher_wall = row.get('teacher_run', results['methods'].get('supervised_a', {})).get('train_wall_s')
        row.update(trainer=trainer, dataset=os.path.basename(union_raw), teacher='supervised_a',
                   teacher_train_wall_s=teacher_wall, pseudolabel_s=args._pseudolabel_s)
        row.update(train(args, dataset_id, trainer, method))
    else:
        dataset_id, trainer = ids['a'], method
        row.update(trainer=trainer, dataset=os.path.basename(raw['a']))
        row.update(train(args, dataset_id, trainer, method))
    row.update(predict_and_evaluate(args, dataset_id, trainer, raw['a'], method))
    if args.switch_diagnostic:
        diagnostic = teacher_at_switch(args, ids, raw, trainer, method)
        if diagnostic is not None:
            row['teacher_at_switch'] = diagnostic
    if args.snapshot_epochs:
        row['snapshots'] = snapshot_rows(args, dataset_id, trainer, raw['a'], method)
    m = row['metrics']
    log(args, f'{method}: Dice {m["dice"]:.4f}, Jaccard {m["jaccard"]:.4f}, 95HD {m["hd95_voxel"]:.2f} vox, '
              f'ASD {m["asd_voxel"]:.2f} vox, train {row["train_wall_s"]:.0f} s, {row["s_per_iteration"]:.3f} s/it')
    return row


def selftrain_note(selftrain: Dict) -> str:
    batch = f' (batch {selftrain["batch_size"]})' if 'batch_size' in selftrain else ''  # rows before 2026-12-04 lack it
    return (f'`selftrain`: teacher = the `supervised_a` model ({selftrain["teacher_train_wall_s"] / 60:.1f} min), '
            f'pseudo-labelling {selftrain["pseudolabel_s"] / 60:.1f} min, plus planning the union; train wall is the '
            f'student only{batch}.' + teacher_rerun_note(selftrain))


def teacher_rerun_note(selftrain: Dict) -> str:
    teacher = selftrain.get('teacher_run')
    if not teacher:
        return ''
    return (f' Its teacher was a rerun of supervised_a with the same seed and schedule ({teacher["date"]}): Dice '
            f'{teacher["metrics"]["dice"] * 100:.2f} % (the supervised_a row above is the earlier run; the difference '
            f'is run-to-run variation or a code change between the two dates).')


def teacher_at_switch(args, ids: Dict[str, int], raw: Dict[str, str], trainer: str, method: str) -> Optional[Dict]:
    """BCP's first pseudo-labels, measured (a diagnostic: never used for a choice). A BCP trainer run with
    ``nnUNet_semiseg_bcp_switch_checkpoint=1`` wrote ``checkpoint_switch.pth``, the student its EMA teacher starts
    from; predict (a)'s unlabeled cases with it (no TTA: the teacher's pseudo-labels have none) and score them
    against their hidden labels, i.e. the same cases' labels in the upper-bound dataset (b). None for a trainer
    without a phase switch."""
    import torch
    folder = model_folder(args, ids['a'], trainer)
    checkpoint = os.path.join(folder, SWITCH_CHECKPOINT)
    if not os.path.isfile(checkpoint):
        log(args, f'{method}: no {SWITCH_CHECKPOINT} (not a BCP trainer): no teacher-at-switch diagnostic')
        return None
    step = int(torch.load(checkpoint, map_location='cpu', weights_only=False)['semiseg']['global_iteration'])
    if 'b' not in raw:   # the hidden labels: reused when (b) is already built in this work folder
        raw['b'] = args.spec.prepare_raw(args, ids['b'], args.spec.raw_name(args, 'b'), args.train_ids,
                                         args.train_ids, args.test_ids)
    images = os.path.join(raw['a'], 'imagesUnlabeled')
    cases = sorted(f[:-len('_0000.nii.gz')] for f in os.listdir(images) if f.endswith('_0000.nii.gz'))
    reference = os.path.join(args.work, 'switch_reference', args.results_tag, method)
    shutil.rmtree(reference, ignore_errors=True)
    os.makedirs(reference)
    for case in cases:
        hidden = os.path.join(raw['b'], 'labelsTr', f'{case}.nii.gz')
        if not os.path.isfile(hidden):
            raise RuntimeError(f'{method}: the unlabeled case {case} has no label in {raw["b"]}/labelsTr (the '
                               f'upper-bound dataset must hold every training case); rebuild it in another --work')
        shutil.copyfile(hidden, os.path.join(reference, f'{case}.nii.gz'))
    out = os.path.join(args.work, 'predictions', args.results_tag, f'{method}_switch')
    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    run_step(['nnUNetv2_predict', '-i', images, '-o', out, '-d', str(ids['a']), '-c', args.spec.configuration,
              '-f', FOLD, '-tr', trainer, '-p', PLANS, '-chk', SWITCH_CHECKPOINT, '-device', args.device,
              '-npp', '1', '-nps', '1', '--disable_tta'], schedule_env(args),
             os.path.join(args.work, 'logs', f'{method}_switch.log'))
    row = args.spec.score(reference, out)
    row.update(step=step, num_cases=len(cases), tta=False, predict_s=time.time() - started)
    log(args, f'{method}: teacher at the switch (step {step}) Dice {row["metrics"]["dice"]:.4f} on the '
              f'{len(cases)} unlabeled cases\' hidden labels')
    return row


def snapshot_rows(args, dataset_id: int, trainer: str, raw_a: str, method: str) -> Dict[str, Dict]:
    """The learning curve: the test cases predicted with each checkpoint_epoch<N>.pth of the run, keyed by the
    iterations done (the schedule study: where a model stops improving on the test cases)."""
    folder = model_folder(args, dataset_id, trainer)
    iterations = trainer_iterations(args, folder)
    curve = {}
    for epoch in args.snapshot_epochs:
        checkpoint = f'checkpoint_epoch{epoch}.pth'
        if not os.path.isfile(os.path.join(folder, checkpoint)):
            raise RuntimeError(f'{method}: {checkpoint} was not written (is epoch {epoch} within the schedule?)')
        row = predict_and_evaluate(args, dataset_id, trainer, raw_a, f'{method}_epoch{epoch}', checkpoint)
        row['epoch'] = epoch
        curve[str(epoch * iterations)] = row
        log(args, f'{method} after {epoch * iterations} iterations: Dice {row["metrics"]["dice"]:.4f}')
    return curve


def pseudolabel(args, ids: Dict[str, int]) -> str:
    env = schedule_env(args)
    union_name = dataset_name_or_none(ids['self'], env['nnUNet_raw'])
    started = time.time()
    if union_name is not None:  # a previous run's union: rebuilt from the current teacher
        shutil.rmtree(os.path.join(env['nnUNet_raw'], union_name))
        shutil.rmtree(os.path.join(env['nnUNet_preprocessed'], union_name), ignore_errors=True)
        shutil.rmtree(os.path.join(env['nnUNet_results'], union_name), ignore_errors=True)
    log(args, f'pseudo-labelling the unlabeled cases of Dataset{ids["a"]} -> Dataset{ids["self"]}')
    run_step(['nnUNetv2_semiseg_pseudolabel', '-d', str(ids['a']), '-c', args.spec.configuration, '-tr',
              SUPERVISED_TRAINER, '-f', FOLD, '-o', str(ids['self']), '-p', PLANS, '-device', args.device,
              '-npp', '1', '-nps', '1'], env, os.path.join(args.work, 'logs', 'selftrain.log'))
    args._pseudolabel_s = time.time() - started
    return os.path.join(env['nnUNet_raw'], dataset_name(ids['self'], env['nnUNet_raw']))


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
        previous = fresh['methods'].get(row['method'])
        if previous is not None:
            row['earlier_runs'] = earlier_runs(previous)
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


def run_scores(row: Dict) -> Dict:
    """What a superseded run keeps of its row: when it ran, its scores and its training time."""
    return {k: row[k] for k in ('date', 'metrics', 'per_case_dice', 'train_wall_s') if k in row}


def earlier_runs(previous: Dict) -> List[Dict]:
    """The replaced row's scores, kept: a rerun of a method (e.g. with a diagnostic on) need not reproduce the
    earlier run (run-to-run variation, or code changed since), and the difference should stay visible."""
    return previous.get('earlier_runs', []) + [run_scores(previous)]


def earlier_runs_note(rows: Dict, order: Sequence[str]) -> str:
    reruns = [(name, rows[name]['earlier_runs']) for name in order if rows[name].get('earlier_runs')]
    if not reruns:
        return ''
    return ('Reruns (same seed, schedule and draw; the table shows the latest run; the difference is '
            'run-to-run variation or a code change between the dates): ' + '; '.join(
                f'`{name}` earlier ' + ', '.join(f'{fmt(e["metrics"]["dice"], 2, 100)} % ({e["date"]})' for e in runs)
                for name, runs in reruns) + '.')


def summary_figure_path(args) -> str:
    prefix = args.spec.prefix
    if args.smoke:
        return os.path.join(args.work, f'{prefix}_smoke.png')
    name = prefix if args.results_base == args.spec.main_protocol else args.results_base
    return os.path.join(REPO, 'docs', 'figures', name + '.png')


def render_summary(args) -> None:
    """The across-seed (and across-draw) section with paired statistics and its figure, from every JSON of this
    protocol."""
    import accuracy_report
    s = settings(args)
    data = accuracy_report.update(os.path.dirname(args.results), os.path.basename(args.results_base)
                                  if not args.smoke else f'{args.spec.prefix}_smoke', DEFAULT_SEED, args.markdown,
                                  args.summary_key, summary_figure_path(args), args.spec.summary_title(s),
                                  args.spec.summary_description(args, s))
    if data['dice']:
        log(args, f'across-seed summary written to {args.markdown} (section {args.summary_key}), figure '
                  f'{summary_figure_path(args)}')
    args.spec.extra_sections(args, s)


def settings(args) -> Dict:
    epochs, iterations, val_iterations = args.schedule_values
    s = {'labeled': args.labeled_label, 'spacing_mm': args.spacing, 'schedule': args.schedule,
         'epochs': epochs, 'iterations_per_epoch': iterations, 'val_iterations_per_epoch': val_iterations,
         'seed': args.seed, 'device': args.device, 'num_workers_DA': args.num_workers,
         'tta': not args.disable_tta, 'data': os.path.relpath(args.data, REPO),
         'num_train': getattr(args, 'num_train', None), 'num_test': getattr(args, 'num_test', None)}
    if args.labeled_draw:
        s.update(labeled_draw=args.labeled_draw, labeled_cases=list(args.labeled_ids))
    s.update(getattr(args, 'extra_settings', {}))
    return s


def fmt(value, digits=2, scale=1.0) -> str:
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


def schedule_length(s: Dict) -> str:
    epochs, iterations = s['epochs'], s['iterations_per_epoch']
    return f'{epochs * iterations} iterations' if epochs else "nnU-Net's full schedule"


def render(args, results: Dict) -> None:
    spec = args.spec
    rows = results['methods']
    s = results.get('settings') or settings(args)
    a, b = rows.get('supervised_a'), rows.get('supervised_b')
    order = [m for m in spec.default_methods if m in rows] + sorted(m for m in rows if m not in spec.default_methods)
    seed_flag = f' --seed {s["seed"]}' if s['seed'] != DEFAULT_SEED else ''
    draw_flag = f' --labeled-draw {s["labeled_draw"]}' if s.get('labeled_draw') else ''
    extra_headers = ''.join(f' {h} |' for h, _ in spec.table_columns)
    lines = [spec.table_title(s), '', spec.table_description(args, s), '',
             '| method | trainer | training data | Dice % | Jaccard % | 95HD vox (mm) | ASD vox (mm) |' + extra_headers
             + ' Dice % LCC | gap closed | train wall | s/it | load avg | measured |',
             '|---|---|---|---|---|---|---|' + '---|' * len(spec.table_columns) + '---|---|---|---|---|---|']
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
        extra_cells = ''.join(f' {cell(r)} |' for _, cell in spec.table_columns)
        lines.append(
            f'| {name} | `{r["trainer"]}` | {r["dataset"]} | {fmt(m["dice"], 2, 100)} | '
            f'{fmt(m["jaccard"], 2, 100)} | {fmt(m["hd95_voxel"])} ({fmt(m["hd95_mm"], 1)}) | '
            f'{fmt(m["asd_voxel"])} ({fmt(m["asd_mm"], 1)}) |{extra_cells} {fmt(ml["dice"], 2, 100)} | {gap_text} | '
            f'{r["train_wall_s"] / 60:.1f} min | {fmt(r["s_per_iteration"], 3)} | '
            f'{"/".join(f"{x:.1f}" for x in r.get("load_avg_1min", [])) or "n/a"} | {r["date"]} |')
    machines = sorted({f'{r["machine"]["cpu"]}, {r["machine"]["cores"]} cores' +
                       (f', {r["machine"]["gpu"]}' if r['machine'].get('gpu') else '') +
                       f', torch {r["machine"]["torch"]}, nnunetv2 {r["machine"].get("nnunetv2", "?")}'
                       for r in rows.values()})
    lines += ['', f'Machine: {"; ".join(machines) or "n/a (nothing measured yet)"}. ' + spec.table_footer(s)]
    extra = [selftrain_note(rows['selftrain'])] if 'selftrain' in rows else []
    missing = [m for m in spec.default_methods if m not in rows]
    if missing:
        labeled_flag = f' --labeled {s["labeled"]}' if s['labeled'] != spec.default_labeled else ''
        extra.append('Not yet measured: ' + ', '.join(
            f'`{m}` (run `python benchmarks/{spec.prefix}.py --method {m}'
            f'{labeled_flag}{schedule_flags(s)}{draw_flag}{seed_flag}`)'
            for m in missing) + '.')
    switch = [(name, rows[name]['teacher_at_switch']) for name in order if rows[name].get('teacher_at_switch')]
    if switch:
        extra.append('Teacher at BCP\'s phase switch (diagnostic only, never used for a choice: '
                     f'`{SWITCH_CHECKPOINT}` predicting the unlabeled cases without TTA, scored against '
                     'their hidden labels): ' + '; '.join(
                         f'`{name}` step {d["step"]}: Dice {fmt(d["metrics"]["dice"], 2, 100)} % '
                         f'({d["num_cases"]} cases)' for name, d in switch) + '.')
    extra += [note for note in [earlier_runs_note(rows, order)] if note]
    extra += results.get('notes', [])
    for paragraph in extra:
        lines += ['', paragraph]
    os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
    replace_section(args.markdown, args.section_key, '\n'.join(lines))
    log(args, f'table written to {args.markdown} (section {args.section_key})')


# ---------------------------------------------------------------------------------------------------------- main
def build_parser(spec: DatasetSpec, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--method', nargs='+', default=None,
                   help=f'methods to run, in order (default: {" ".join(spec.default_methods)}; smoke: '
                        f'{" ".join(spec.smoke_methods)})')
    p.add_argument('--labeled', type=int, default=spec.default_labeled, choices=spec.labeled_choices,
                   help=f'labeled {spec.unit}s (patients for ACDC) in (a)')
    p.add_argument('--labeled-draw', '--labeled_draw', dest='labeled_draw', type=int, default=0, metavar='K',
                   help='label draw: the labeled set is the K-th block of --labeled consecutive training-list '
                        'entries (0 = the first ones, the literature\'s choice); draws > 0 get their own datasets, '
                        'JSON and table')
    p.add_argument('--schedule', choices=('default', 'full'), default='default',
                   help='default: 20 epochs x 50 iterations (1000), 5 validation iterations; full: nnU-Net\'s '
                        '1000 x 250 (for a GPU)')
    p.add_argument('--epochs', type=int, default=None,
                   help='custom schedule: epochs (with --iterations-per-epoch; results go to their own JSON and '
                        'markdown section, tagged with the total iterations)')
    p.add_argument('--iterations-per-epoch', dest='iterations_per_epoch', type=int, default=None)
    p.add_argument('--val-iterations', dest='val_iterations', type=int, default=None,
                   help='validation iterations per epoch for a custom schedule (default 5)')
    p.add_argument('--data', default=None, help=f'the {spec.display} h5 data (default: {spec.default_data()})')
    p.add_argument('--work', default=None, help=f'working folder, reused across calls (default: '
                                                f'<tmp>/semiseg_{spec.prefix}, smoke: <tmp>/semiseg_{spec.prefix}_smoke)')
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
    p.add_argument('--switch-diagnostic', dest='switch_diagnostic', action='store_true',
                   help='BCP trainers: also score the teacher at the phase switch on the unlabeled cases\' hidden '
                        f'labels ({SWITCH_CHECKPOINT_ENV_VAR}=1; stored as the row\'s teacher_at_switch)')
    p.add_argument('--results', default=None, help=f'results JSON (default: benchmarks/results/{spec.prefix}_*.json; '
                                                   'smoke: in the work folder)')
    p.add_argument('--markdown', default=None, help='markdown file (default: docs/benchmarks.md; smoke: in the work '
                                                    'folder)')
    p.add_argument('--note', default=None,
                   help='with --render-only: store this note in the results JSON (shown under the table); '
                        '"" clears the notes')
    p.add_argument('--render-only', dest='render_only', action='store_true',
                   help='only rebuild the markdown table from the results JSON')
    p.add_argument('--smoke', action='store_true', help='a few iterations on a handful of real cases')
    return p


def parse_args(spec: DatasetSpec, description: str, argv=None):
    args = build_parser(spec, description).parse_args(argv)
    args.spec = spec
    args.data = os.path.abspath(args.data or spec.default_data())
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
    if args.labeled_draw < 0:
        raise SystemExit(f'--labeled-draw must be >= 0, got {args.labeled_draw}')
    args.labeled_label = args.labeled
    return args


def main(spec: DatasetSpec, description: str, argv=None, extra: Optional[Dict] = None) -> int:
    """Run the benchmark of ``spec``; ``extra`` = dataset-specific option values set on ``args``."""
    args = parse_args(spec, description, argv)
    for key, value in (extra or {}).items():
        setattr(args, key, value)
    problem = spec.data_check(args.data)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    train_ids, test_ids = spec.case_ids(args)
    args.num_train, args.num_test = len(train_ids), len(test_ids)
    args.train_ids, args.test_ids = train_ids, test_ids
    try:
        args.labeled_ids = draw_labeled(train_ids, args.labeled, args.labeled_draw) if train_ids else []
    except ValueError as e:
        raise SystemExit(str(e))
    tag = 'smoke' if args.smoke else spec.protocol_tag(args)
    base_tag = tag
    if not args.smoke and args.labeled_draw:   # another label draw: its own JSON and table, same summary
        tag += f'_draw{args.labeled_draw}'
    if not args.smoke and args.seed != DEFAULT_SEED:  # another seed = its own JSON and table (seed-to-seed spread)
        tag += f'_seed{args.seed}'
    args.results_tag = tag
    # every seed's (and draw's) JSON of one protocol shares this base name; accuracy_report.py summarises them
    args.results_base = f'{spec.prefix}_{base_tag}' + ('' if args.device == 'cpu' else f'_{args.device}')
    args.summary_key = f'{spec.prefix}:summary:{args.device}:{base_tag.replace("_", ":")}'
    args.section_key = f'{spec.prefix}:{args.device}:{tag.replace("_", ":")}'
    if args.work is None:
        args.work = os.path.join(tempfile.gettempdir(), f'semiseg_{spec.prefix}' + ('_smoke' if args.smoke else ''))
    args.work = os.path.abspath(args.work)
    if args.results is None:
        suffix = tag[len(base_tag):]
        args.results = os.path.join(args.work, 'results', f'{spec.prefix}_smoke.json') if args.smoke else \
            os.path.join(SCRIPT_DIR, 'results', args.results_base + suffix + '.json')
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
    methods = args.method or (spec.smoke_methods if args.smoke else spec.default_methods)

    os.makedirs(os.path.join(args.work, 'logs'), exist_ok=True)
    log(args, f'work folder {args.work}; {len(train_ids)} training and {len(test_ids)} test {spec.unit}s; '
              f'labeled (draw {args.labeled_draw}): {", ".join(args.labeled_ids)}; methods {methods}')

    budget = 'smoke' if args.smoke else args.labeled
    draw = args.labeled_draw
    ids = {'a': spec.dataset_ids[('a', budget, draw)], 'self': spec.dataset_ids[('self', budget, draw)],
           'b': spec.dataset_ids[('b', None, 0)]}
    raw = {'a': spec.prepare_raw(args, ids['a'], spec.raw_name(args, 'a'), args.labeled_ids, train_ids, test_ids)}
    plan_and_preprocess(args, ids['a'], with_unlabeled=True, ids=ids, arm='a')
    if 'supervised_b' in methods:
        raw['b'] = spec.prepare_raw(args, ids['b'], spec.raw_name(args, 'b'), train_ids, train_ids, test_ids)
        plan_and_preprocess(args, ids['b'], with_unlabeled=False, ids=ids, arm='b')
    for method in methods:
        log(args, f'=== {method} ===')
        merge_row(args, results, run_method(args, method, ids, raw, results))
    return 0
