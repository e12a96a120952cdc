#!/usr/bin/env python
"""Accuracy benchmark on real data: the LA subset in ``../shared/data/la_h5_uamt_subset`` (20 training cases and
every test case present, 12 in today's subset, of the UA-MT h5 release; the row records which), resampled to
2.5 mm isotropic so that a run fits a 2-core CPU.

Datasets (built once per ``--work`` folder with the LA converter and its ``--target-spacing``):

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

import os
import shutil
import sys
from typing import Dict, List, Tuple

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
if SCRIPT_DIR not in sys.path:
    sys.path.insert(0, SCRIPT_DIR)

import accuracy_common as common  # noqa: E402
from accuracy_common import REPO, SPLIT_DIR, log, raw_params_marker, read_ids, run_step, write_lists  # noqa: E402

CASE_FOLDER = '2018LA_Seg_Training Set'
TARGET_SPACING = 2.5
SMOKE_SPACING = 5.0  # the smoke run only checks the path: smaller images, faster
CONFIGURATION = '3d_fullres'
DEFAULT_METHODS = ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher', 'selftrain', 'nnUNetTrainerSSNet',
                   'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerFLPM', 'nnUNetTrainerSSNetFLPM',
                   'nnUNetTrainerDualStream', 'nnUNetTrainerDualStream_releasedCode', 'nnUNetTrainerBCP']
SMOKE_METHODS = ['supervised_a', 'nnUNetTrainerMeanTeacher']
MAIN_PROTOCOL = 'accuracy_la_labeled2_it300_test12'   # the evidence protocol: its figure is docs/figures/accuracy_la.png

# dataset IDs: (arm, label budget, label draw); smoke datasets separately. Draw 0 keeps the IDs of every earlier run.
DATASET_IDS = {('a', 2, 0): 951, ('b', None, 0): 952, ('a', 1, 0): 953, ('self', 2, 0): 954, ('self', 1, 0): 955,
               ('a', 'smoke', 0): 971, ('self', 'smoke', 0): 974,
               **{('a', 2, k): 960 + k for k in range(1, 5)}, **{('self', 2, k): 965 + k for k in range(1, 5)}}


def default_data() -> str:
    from nnunetv2_semiseg.utilities.real_data import real_data_folder
    return real_data_folder('LA')


def data_check(data: str):
    case_root = os.path.join(data, CASE_FOLDER)
    if not os.path.isdir(case_root):
        return (f'LA data not found: {case_root} does not exist (pass --data, the folder containing '
                f"'{CASE_FOLDER}/', or set nnUNet_semiseg_LA_h5)")
    return None


def case_ids(args) -> Tuple[List[str], List[str]]:
    present = set(os.listdir(os.path.join(args.data, CASE_FOLDER)))
    train_ids = [c for c in read_ids(os.path.join(SPLIT_DIR, 'la_train.txt')) if c in present]
    test_ids = [c for c in read_ids(os.path.join(SPLIT_DIR, 'la_test.txt')) if c in present]
    if args.smoke:
        train_ids, test_ids = train_ids[:4], test_ids[:1]
    args.spacing = SMOKE_SPACING if args.smoke else TARGET_SPACING
    return train_ids, test_ids


def raw_name(args, arm: str) -> str:
    if arm == 'b':
        return f'LA25mm_L{args.num_train}'
    if args.smoke:
        return 'LA5mm_smoke'
    return f'LA25mm_L{args.labeled}' + (f'_draw{args.labeled_draw}' if args.labeled_draw else '')


def prepare_raw(args, dataset_id: int, name: str, labeled_ids: List[str], train_ids: List[str],
                test_ids: List[str]) -> str:
    """Convert with the LA converter (``--target-spacing``: the benchmark's spacing) into a temporary root, then
    move into ``nnUNet_raw``; reused when present."""
    work, labeled = args.work, len(labeled_ids)
    raw_root = os.path.join(work, 'nnUNet_raw')
    final = os.path.join(raw_root, f'Dataset{dataset_id:03d}_{name}')
    params = {'data': os.path.abspath(args.data), 'labeled': labeled, 'train': train_ids, 'test': test_ids,
              'spacing': args.spacing}
    first_cases = list(labeled_ids) == list(train_ids[:labeled])
    if not first_cases:  # a label draw other than the first cases (draw 0 keeps the earlier marker)
        params['labeled_ids'] = list(labeled_ids)
    if raw_params_marker(final, params):
        log(args, f'raw dataset {os.path.basename(final)} present, reused')
        return final
    log(args, f'building raw dataset {os.path.basename(final)} ({labeled} labeled, {len(train_ids) - labeled} '
              f'unlabeled, {len(test_ids)} test, {args.spacing} mm)')
    tmp_root = os.path.join(work, f'tmp_convert_{dataset_id}')
    shutil.rmtree(tmp_root, ignore_errors=True)
    lists = write_lists(tmp_root, train=train_ids, test=test_ids, labeled=labeled_ids)
    out_root = os.path.join(tmp_root, 'raw')
    labeled_args = ['--labeled', str(labeled)] if first_cases else ['--labeled-list', lists['labeled']]
    run_step(['nnUNetv2_semiseg_convert_LA', '-i', args.data, '-d', str(dataset_id), '--name', name, '--output',
              out_root, *labeled_args, '--train-list', lists['train'], '--test-list', lists['test'],
              *common.target_spacing_args((args.spacing,) * 3)],
             dict(os.environ), os.path.join(work, 'logs', 'prepare.log'))
    common.install_converted(os.path.join(out_root, f'Dataset{dataset_id:03d}_{name}'), final, params)
    shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def score(ref: str, out: str) -> Dict:
    from nnunetv2_semiseg.evaluation.evaluate import evaluate_folders
    plain = evaluate_folders(ref, out, labels=[1])
    lcc = evaluate_folders(ref, out, labels=[1], lcc=True)
    return {'metrics': {k: float(v) for k, v in plain['foreground_mean'].items()},
            'metrics_lcc': {k: float(v) for k, v in lcc['foreground_mean'].items()},
            'per_case_dice': {c['case']: float(c['metrics']['1']['dice']) for c in plain['per_case']},
            'per_case_hd95_voxel': {c['case']: float(c['metrics']['1']['hd95_voxel']) for c in plain['per_case']},
            'test_cases': sorted(c['case'] for c in plain['per_case'])}


def protocol_tag(args) -> str:
    tag = f'labeled{args.labeled}' + ('' if args.schedule == 'default' else f'_{args.schedule}')
    if args.num_test != 4:  # the 12-case protocol: own files, the 4-case tables stay as they were
        tag += f'_test{args.num_test}'
    return tag


def table_title(s: Dict) -> str:
    seed = f', seed {s["seed"]}' if s['seed'] != common.DEFAULT_SEED else ''
    draw = f', label draw {s["labeled_draw"]}' if s.get('labeled_draw') else ''
    return (f'### Accuracy on real LA data: {s["labeled"]} labeled cases, {s["device"].upper()}, '
            f'{common.schedule_length(s)}' + draw + seed)


def table_description(args, s: Dict) -> str:
    epochs, iterations = s['epochs'], s['iterations_per_epoch']
    length = common.schedule_length(s)
    total = f'{length} ({epochs} epochs x {iterations})' if epochs else f'{length} (1000 epochs x 250 iterations)'
    draw = (f' Label draw {s["labeled_draw"]}: labeled = {", ".join(s["labeled_cases"])} (training-list entries '
            f'{s["labeled_draw"] * s["labeled"] + 1}-{(s["labeled_draw"] + 1) * s["labeled"]}).'
            if s.get('labeled_draw') else '')
    return (f'`benchmarks/accuracy_la.py` (the UA-MT h5 release, copy `{os.path.basename(os.path.normpath(s["data"]))}`: every training and test ID of the UA-MT split present '
            f'in the subset; here {s.get("num_train") or 20} training and {s.get("num_test") or 4} test cases), '
            f'converted with `nnUNetv2_semiseg_convert_LA` and resampled to {s["spacing_mm"]} mm '
            f'isotropic. (a) = {s["labeled"]} labeled + the other training cases unlabeled, (b) = all training '
            f'cases labeled (the upper bound); the same test cases for all. Stock `nnUNetv2_plan_and_preprocess` (`3d_fullres`, `nnUNetPlans`), '
            f'fold `all`, {total}, {s["val_iterations_per_epoch"] or 50} validation iterations per epoch, seed '
            f'{s["seed"]} (`nnUNet_semiseg_seed`), `nnUNet_n_proc_DA={s["num_workers_DA"]}`, prediction of the '
            f'test cases with `checkpoint_final.pth` {"with" if s["tta"] else "without"} mirroring TTA. '
            f'Results JSON: `{os.path.relpath(args.results, REPO)}`.' + draw)


def table_footer(s: Dict) -> str:
    return ('Train wall = the whole `nnUNetv2_train` command (start-up, '
            'training, nnU-Net\'s final validation, which on fold `all` predicts the training cases); s/it = '
            'median epoch time of the training log / iterations per epoch (includes the few validation '
            'iterations of each epoch). Gap closed = (Dice - Dice supervised_a) / (Dice supervised_b - Dice '
            'supervised_a). Distances in voxels of the 2.5 mm grid (mm in brackets; not comparable with the '
            "papers' voxel numbers on the 0.625 mm grid). LCC = largest connected component kept (SS-Net/BCP "
            'protocol); the main columns are without it. Load avg = the machine\'s 1-minute load average '
            'before/after training (the box is shared: a load above the core count slows every run and '
            'inflates the times).')


def summary_title(s: Dict) -> str:
    return (f'Accuracy on real LA data across seeds: {s["labeled"]} labeled, {s["device"].upper()}, '
            f'{common.schedule_length(s)}, {s["num_test"]} test cases')


def summary_description(args, s: Dict) -> str:
    return (f'Every seed of this protocol (`{args.results_base}*.json`), {s["num_train"]} training cases '
            f'({s["labeled"]} labeled for (a), all for supervised_b), {s["num_test"]} test cases, '
            f'{s["spacing_mm"]} mm; per-seed tables below.')


LA = common.DatasetSpec(
    key='la', prefix='accuracy_la', display='LA', configuration=CONFIGURATION, default_data=default_data,
    data_check=data_check, case_ids=case_ids, prepare_raw=prepare_raw, raw_name=raw_name, score=score,
    dataset_ids=DATASET_IDS, default_methods=DEFAULT_METHODS, smoke_methods=SMOKE_METHODS,
    main_protocol=MAIN_PROTOCOL, labeled_choices=(1, 2), default_labeled=2, protocol_tag=protocol_tag,
    table_title=table_title, table_description=table_description, table_columns=[], table_footer=table_footer,
    summary_title=summary_title, summary_description=summary_description)


def main(argv=None) -> int:
    return common.main(LA, __doc__, argv)


if __name__ == '__main__':
    raise SystemExit(main())
