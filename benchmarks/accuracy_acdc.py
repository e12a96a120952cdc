#!/usr/bin/env python
"""Accuracy benchmark on real ACDC data (cine-MRI, 2D, three classes: RV, MYO, LV): the SSL4MIS h5 volumes in
``nnUNet_semiseg_ACDC_h5`` (default ``../shared/data/acdc_h5_ssl4mis_subset``), trained in nnU-Net's ``2d``
configuration.

Protocol (the literature's "3 labeled patients" setting, SS-Net / BCP / SSL4MIS):

- (a) the first 3 patients of the SSL4MIS training list labeled (6 volumes, ED + ES), every other training patient
  present unlabeled (47 in today's subset of 50), the 20 test patients (40 volumes);
- (b) every training patient present labeled (the upper bound), the same test patients;
- self-training union as for LA.

Data path: ``nnUNetv2_semiseg_convert_ACDC`` (h5 form: assumed spacing 1 x 1 mm in-plane, 10 mm between slices,
the value SSL4MIS writes its predictions with), then in-plane resampling by ``--inplane-factor`` (default 2: the
in-plane grid becomes 2 x 2 "h5 mm", the slice axis is untouched; see docs/benchmarks.md for why), stock
planning and preprocessing of ``2d``, fold ``all``.

Scoring as the ACDC literature scores: per 3D volume and per class (RV, MYO, LV) Dice, Jaccard, 95HD and ASD with
``evaluate_folders``, then the mean over the three classes; the per-class Dice is reported too. Paired statistics
pair (test volume, seed[, label draw]).

    python benchmarks/accuracy_acdc.py --method supervised_a supervised_b --epochs 15 --iterations-per-epoch 20 \\
        --val-iterations 2
    python benchmarks/accuracy.py --dataset acdc --method nnUNetTrainerBCP --epochs 15 --iterations-per-epoch 20 \\
        --val-iterations 2 --seed 2
    python benchmarks/accuracy_acdc.py --smoke --work /tmp/x          # a few iterations on 5 + 1 real patients
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

CONFIGURATION = '2d'
CLASSES = {'1': 'RV', '2': 'MYO', '3': 'LV'}
INPLANE_FACTOR = 2         # in-plane resampling factor on the h5 grid (see the module docstring)
SMOKE_INPLANE_FACTOR = 4   # the smoke run only checks the path
H5_SPACING_XYZ = (1.0, 1.0, 10.0)   # the converter's assumption for the h5 release
DEFAULT_METHODS = ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher', 'selftrain', 'nnUNetTrainerSSNet',
                   'nnUNetTrainerSSNet_ACDC', 'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerFLPM',
                   'nnUNetTrainerDualStream', 'nnUNetTrainerBCP']
SMOKE_METHODS = ['supervised_a', 'nnUNetTrainerMeanTeacher']
MAIN_PROTOCOL = 'accuracy_acdc_labeled3_it300'   # its figure is docs/figures/accuracy_acdc.png

DATASET_IDS = {**{('a', 3, k): 981 + k for k in range(3)}, ('b', None, 0): 984,
               **{('self', 3, k): 985 + k for k in range(3)}, ('a', 'smoke', 0): 988, ('self', 'smoke', 0): 989}


def default_data() -> str:
    from nnunetv2_semiseg.utilities.real_data import real_data_folder
    return real_data_folder('ACDC')


def data_check(data: str):
    if not os.path.isdir(os.path.join(data, 'data')):
        return (f'ACDC data not found: {os.path.join(data, "data")} does not exist (pass --data, the folder '
                f"containing 'data/patientXXX_frame01.h5', or set nnUNet_semiseg_ACDC_h5)")
    return None


def _present(data: str, patient: str) -> bool:
    return all(os.path.isfile(os.path.join(data, 'data', f'{patient}_frame0{n}.h5')) for n in (1, 2))


def case_ids(args) -> Tuple[List[str], List[str]]:
    """Training and test PATIENTS of the SSL4MIS lists whose two volumes are present."""
    train_ids = [p for p in read_ids(os.path.join(SPLIT_DIR, 'acdc_train_patients.txt')) if _present(args.data, p)]
    test_ids = [p for p in read_ids(os.path.join(SPLIT_DIR, 'acdc_test_patients.txt')) if _present(args.data, p)]
    if args.smoke:
        train_ids, test_ids = train_ids[:args.labeled + 2], test_ids[:1]
    args.spacing = 'in-plane x%d' % (SMOKE_INPLANE_FACTOR if args.smoke else args.inplane_factor)
    args.extra_settings = {'inplane_factor': SMOKE_INPLANE_FACTOR if args.smoke else args.inplane_factor,
                           'configuration': CONFIGURATION, 'h5_spacing_xyz': list(H5_SPACING_XYZ)}
    return train_ids, test_ids


def raw_name(args, arm: str) -> str:
    factor = SMOKE_INPLANE_FACTOR if args.smoke else args.inplane_factor
    if arm == 'b':
        return f'ACDCx{factor}_L{args.num_train}'
    if args.smoke:
        return f'ACDCx{factor}_smoke'
    return f'ACDCx{factor}_L{args.labeled}' + (f'_draw{args.labeled_draw}' if args.labeled_draw else '')


def prepare_raw(args, dataset_id: int, name: str, labeled_ids: List[str], train_ids: List[str],
                test_ids: List[str]) -> str:
    """Convert with the ACDC converter (h5 form, ``--target-spacing`` in-plane) into a temporary root, then move
    into ``nnUNet_raw``."""
    work = args.work
    factor = SMOKE_INPLANE_FACTOR if args.smoke else args.inplane_factor
    final = os.path.join(work, 'nnUNet_raw', f'Dataset{dataset_id:03d}_{name}')
    params = {'data': os.path.abspath(args.data), 'labeled': list(labeled_ids), 'train': train_ids,
              'test': test_ids, 'inplane_factor': factor}
    if raw_params_marker(final, params):
        log(args, f'raw dataset {os.path.basename(final)} present, reused')
        return final
    log(args, f'building raw dataset {os.path.basename(final)} ({len(labeled_ids)} labeled, '
              f'{len(train_ids) - len(labeled_ids)} unlabeled, {len(test_ids)} test patients, in-plane x{factor})')
    tmp_root = os.path.join(work, f'tmp_convert_{dataset_id}')
    shutil.rmtree(tmp_root, ignore_errors=True)
    lists = write_lists(tmp_root, train=train_ids, test=test_ids, labeled=labeled_ids)
    out_root = os.path.join(tmp_root, 'raw')
    target = (H5_SPACING_XYZ[0] * factor, H5_SPACING_XYZ[1] * factor, None) if factor != 1 else None
    run_step(['nnUNetv2_semiseg_convert_ACDC', '-i', args.data, '--format', 'h5', '-d', str(dataset_id),
              '--name', name, '--output', out_root, '--labeled-list', lists['labeled'], '--train-list',
              lists['train'], '--test-list', lists['test'], *common.target_spacing_args(target)], dict(os.environ),
             os.path.join(work, 'logs', 'prepare.log'))
    common.install_converted(os.path.join(out_root, f'Dataset{dataset_id:03d}_{name}'), final, params)
    shutil.rmtree(tmp_root, ignore_errors=True)
    return final


BATCH_RECORDS = {'b': 'upper_bound_batch', 'self': 'selftrain_batch'}


def train_with_the_labeled_batch(args, ids: Dict, arm: str) -> None:
    """(b) and the self-training student train with (a)'s batch size. nnU-Net caps a 2d batch at 5 % of the
    dataset's voxels, so its own plan gives the 3-patient set a batch of 3 and a 50-patient set 43: the upper bound
    (all 50 labeled) and the student (3 labeled + 47 pseudo-labelled) would see 14x the slices per iteration (and
    cost 14x on a CPU). With (a)'s batch every row sees the same slices per iteration and the rows differ only in
    what is labeled and how it is used."""
    if arm not in BATCH_RECORDS:
        return
    import json
    path = common.plans_file(args, ids[arm])
    record = os.path.join(os.path.dirname(path), 'benchmark_batch_size.json')
    if not os.path.isfile(record):
        with open(common.plans_file(args, ids['a'])) as f:
            batch = json.load(f)['configurations'][CONFIGURATION]['batch_size']
        with open(path) as f:
            plans = json.load(f)
        done = {'planned': plans['configurations'][CONFIGURATION]['batch_size'], 'used': batch}
        plans['configurations'][CONFIGURATION]['batch_size'] = batch
        with open(path + '.tmp', 'w') as f:
            json.dump(plans, f, indent=4)
        os.replace(path + '.tmp', path)
        with open(record, 'w') as f:
            json.dump(done, f)
        log(args, f'{os.path.basename(os.path.dirname(path))}: 2d batch size {batch} (that of the labeled set) '
                  f'instead of the planned {done["planned"]}')
    with open(record) as f:
        args.extra_settings[BATCH_RECORDS[arm]] = json.load(f)


def score(ref: str, out: str) -> Dict:
    """Per volume and class, then the mean over RV, MYO and LV (the ACDC literature's numbers)."""
    from nnunetv2_semiseg.evaluation.evaluate import evaluate_folders
    labels = [int(k) for k in CLASSES]
    plain = evaluate_folders(ref, out, labels=labels)
    lcc = evaluate_folders(ref, out, labels=labels, lcc=True)
    return {'metrics': {k: float(v) for k, v in plain['foreground_mean'].items()},
            'metrics_lcc': {k: float(v) for k, v in lcc['foreground_mean'].items()},
            'per_class': {CLASSES[k]: {m: float(v) for m, v in plain['mean'][k].items()} for k in CLASSES},
            'per_case_dice': {c['case']: float(c['mean_foreground']['dice']) for c in plain['per_case']},
            'per_case_hd95_voxel': {c['case']: float(c['mean_foreground']['hd95_voxel']) for c in plain['per_case']},
            'per_case_class_dice': {c['case']: {CLASSES[k]: float(c['metrics'][k]['dice']) for k in CLASSES}
                                    for c in plain['per_case']},
            'test_cases': sorted(c['case'] for c in plain['per_case'])}


def protocol_tag(args) -> str:
    tag = f'labeled{args.labeled}' + ('' if args.schedule == 'default' else f'_{args.schedule}')
    if args.inplane_factor != INPLANE_FACTOR:
        tag += f'_x{args.inplane_factor}'
    return tag


def _class_dice(row: Dict) -> str:
    per_class = row.get('per_class')
    if not per_class:
        return 'n/a'
    return ' / '.join(common.fmt(per_class[name]['dice'], 1, 100) for name in CLASSES.values())


def table_title(s: Dict) -> str:
    seed = f', seed {s["seed"]}' if s['seed'] != common.DEFAULT_SEED else ''
    draw = f', label draw {s["labeled_draw"]}' if s.get('labeled_draw') else ''
    return (f'### Accuracy on real ACDC data: {s["labeled"]} labeled patients, {s["device"].upper()}, '
            f'{common.schedule_length(s)}' + draw + seed)


def table_description(args, s: Dict) -> str:
    epochs, iterations = s['epochs'], s['iterations_per_epoch']
    length = common.schedule_length(s)
    total = f'{length} ({epochs} epochs x {iterations})' if epochs else f'{length} (1000 epochs x 250 iterations)'
    draw = (f' Label draw {s["labeled_draw"]}: labeled = {", ".join(s["labeled_cases"])}.'
            if s.get('labeled_draw') else '')
    return (f'`benchmarks/accuracy_acdc.py` (the SSL4MIS h5 release, copy `{os.path.basename(os.path.normpath(s["data"]))}`: the SSL4MIS training patients present, here '
            f'{s.get("num_train")}, and the {s.get("num_test")} test patients, both frames each), converted with '
            f'`nnUNetv2_semiseg_convert_ACDC` (h5 form) and resampled in-plane by a factor '
            f'{s.get("inplane_factor")} (slice axis untouched). (a) = the first {s["labeled"]} training patients '
            f'labeled + the other training patients unlabeled, (b) = all training patients labeled (the upper '
            f'bound); the same test volumes for all. Stock `nnUNetv2_plan_and_preprocess` (`2d`, `nnUNetPlans`), '
            f'fold `all`, {total}, {s["val_iterations_per_epoch"] or 50} validation iterations per epoch, seed '
            f'{s["seed"]} (`nnUNet_semiseg_seed`), `nnUNet_n_proc_DA={s["num_workers_DA"]}`, prediction of the '
            f'test volumes with `checkpoint_final.pth` {"with" if s["tta"] else "without"} mirroring TTA. Metrics '
            f'per volume and class, then the mean over RV, MYO and LV. Results JSON: '
            f'`{os.path.relpath(args.results, REPO)}`.' + draw)


def table_footer(s: Dict) -> str:
    return ('Train wall = the whole `nnUNetv2_train` command; s/it = median epoch time / iterations per epoch. Gap '
            'closed = (Dice - Dice supervised_a) / (Dice supervised_b - Dice supervised_a). Distances in voxels of '
            'the resampled grid (in-plane voxels are anisotropic with the slice axis; mm in brackets are in the '
            'h5 release\'s assumed units, not true millimetres). LCC = largest connected component kept per class. '
            'Load avg = the 1-minute load average before/after training.')


def summary_title(s: Dict) -> str:
    return (f'Accuracy on real ACDC data across seeds: {s["labeled"]} labeled patients, {s["device"].upper()}, '
            f'{common.schedule_length(s)}, {2 * (s["num_test"] or 0)} test volumes')


def summary_description(args, s: Dict) -> str:
    return (f'Every seed of this protocol (`{args.results_base}*.json`), {s["num_train"]} training patients '
            f'({s["labeled"]} labeled for (a), all for supervised_b), {s["num_test"]} test patients '
            f'({2 * (s["num_test"] or 0)} volumes), in-plane factor {s.get("inplane_factor")}; Dice = mean over '
            f'RV, MYO and LV per volume; per-seed tables below.')


ACDC = common.DatasetSpec(
    key='acdc', prefix='accuracy_acdc', display='ACDC', configuration=CONFIGURATION, default_data=default_data,
    data_check=data_check, case_ids=case_ids, prepare_raw=prepare_raw, raw_name=raw_name, score=score,
    dataset_ids=DATASET_IDS, default_methods=DEFAULT_METHODS, smoke_methods=SMOKE_METHODS,
    main_protocol=MAIN_PROTOCOL, labeled_choices=(1, 3, 7), default_labeled=3, protocol_tag=protocol_tag,
    table_title=table_title, table_description=table_description,
    table_columns=[('Dice % RV / MYO / LV', _class_dice)], table_footer=table_footer,
    summary_title=summary_title, summary_description=summary_description, unit='patient',
    adjust_plans=train_with_the_labeled_batch)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    factor = INPLANE_FACTOR
    if '--inplane-factor' in argv:  # dataset-specific option, kept out of the shared parser
        i = argv.index('--inplane-factor')
        factor = int(argv[i + 1])
        del argv[i:i + 2]
    return common.main(ACDC, __doc__, argv, extra={'inplane_factor': factor})


if __name__ == '__main__':
    raise SystemExit(main())
