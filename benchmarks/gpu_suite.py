#!/usr/bin/env python
"""The package's validation and measurement on a CUDA GPU, in one command (or three parts of under 9 minutes each).

    python benchmarks/gpu_suite.py --device cuda                 # both parts
    python benchmarks/gpu_suite.py --device cuda --part 1        # (a) + (b): end to end with AMP, iteration cost
    python benchmarks/gpu_suite.py --device cuda --part 2        # (c) + (d): accuracy table, weight study
    python benchmarks/gpu_suite.py --device cuda --part 3        # (e): the ACDC accuracy table
    python benchmarks/gpu_suite.py --device cpu --smoke          # every step on a CPU, tiny (the test)

Steps, in order of priority:

(a) end to end with AMP for every trainer in ``E2E_TRAINERS``: a synthetic dataset planned by stock nnU-Net,
    ``nnUNetv2_semiseg_preprocess_unlabeled``, ``nnUNetv2_train`` for a few iterations, ``--c`` for one more epoch,
    strict ``nnUNetv2_predict``; once more with nnU-Net's ``torch.compile`` default (``nnUNet_compile`` unset) for
    the trainers that allow it (``allow_torch_compile``);
(b) ``iteration_cost.py`` for every trainer (ratios to ``nnUNetTrainer`` and to ``nnUNetTrainer`` on twice the
    plans' batch; ``torch.cuda.max_memory_allocated``);
(c) the LA accuracy protocol (``accuracy_la.py``: 12 test cases) on the long schedule (1000 iterations, 50 x 20, with the
    test Dice after 300, 500 and 700 iterations as a learning curve)
    for as many methods and seeds as the time budget allows, in ``ACCURACY_PLAN`` order;
(d) the weight study (``STUDY_PLAN``: Mean Teacher's consistency weight and ramp, SS-Net's unsupervised weight) on
    the 300-iteration schedule, two seeds, if time is left;
(e) the ACDC accuracy protocol (``accuracy.py --dataset acdc``: 3 labeled patients, 40 test volumes, ``2d``) on
    1000 iterations (50 x 20), two seeds, for as many of ``ACDC_METHODS`` as the part's budget allows (not run by
    ``--smoke``: the ACDC path has its own smoke test).

Every step records what it ran, how long it took and whether it passed into ``benchmarks/results/gpu_suite_<device>.json``
and the section ``gpu_suite:<device>`` of ``docs/benchmarks.md`` (the GPU model is named there). With ``--smoke``
everything goes to the work folder and the steps shrink to one epoch of two iterations.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for p in (HERE, REPO):
    if p not in sys.path:
        sys.path.insert(0, p)

from nnunetv2_semiseg.demo.pipeline import (StepFailed, nnunet_env, plan_and_preprocess_tiny, run_step,  # noqa: E402
                                            training_env)
from nnunetv2_semiseg.demo.synthetic import make_synthetic_dataset  # noqa: E402

E2E_DATASET = 981
# Every trainer of the package joins (a) and (b); the accuracy plan lists the methods of the table.
NEW_TRAINERS = ['nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerFLPM', 'nnUNetTrainerSSNetFLPM',
                'nnUNetTrainerDualStream', 'nnUNetTrainerBCP']
E2E_TRAINERS = ['nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet'] + NEW_TRAINERS + ['nnUNetTrainerBCPFLPM']
COST_TRAINERS = ['nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet'] + NEW_TRAINERS + \
    ['nnUNetTrainerDualStream_releasedCode', 'nnUNetTrainerBCP_noPretrain']
ACCURACY_METHODS = ['supervised_a', 'supervised_b', 'nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet', 'selftrain',
                    'nnUNetTrainerBCP', 'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerFLPM',
                    'nnUNetTrainerDualStream', 'nnUNetTrainerDualStream_releasedCode', 'nnUNetTrainerSSNetFLPM']
ACCURACY_SEEDS = [12345, 2]
# relative cost of a method's run against supervised_a (measured on CPU, docs/benchmarks.md), to skip what cannot
# finish in the budget; unknown methods count as 5
RELATIVE_COST = {'supervised_a': 1.0, 'supervised_b': 1.0, 'selftrain': 1.3, 'nnUNetTrainerMeanTeacher': 2.0,
                 'nnUNetTrainerSSNet': 4.7, 'nnUNetTrainerBCP': 2.0, 'nnUNetTrainerVoxelAdversarial': 2.5,
                 'nnUNetTrainerFLPM': 2.5, 'nnUNetTrainerDualStream': 3.0, 'nnUNetTrainerDualStream_releasedCode': 3.0,
                 'nnUNetTrainerSSNetFLPM': 5.0}
STUDY_TRAINERS = ['nnUNetTrainerMeanTeacher_consistency1', 'nnUNetTrainerMeanTeacher_ramp10',
                  'nnUNetTrainerSSNet_unsupervised01']
ACDC_METHODS = ['supervised_a', 'supervised_b', 'nnUNetTrainerBCP', 'nnUNetTrainerMeanTeacher', 'selftrain',
                'nnUNetTrainerFLPM', 'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerDualStream', 'nnUNetTrainerSSNet',
                'nnUNetTrainerSSNet_ACDC']
PART_BUDGET_MIN = 8.5


# the CPU study's long schedule: 50 epochs x 20 (the 300-iteration protocol's epoch length), with snapshots after
# 300, 500 and 700 iterations so that one run gives the learning curve
LONG_SCHEDULE = ['--epochs', '50', '--iterations-per-epoch', '20', '--val-iterations', '2',
                 '--snapshot-epochs', '15,25,35']
# the CPU protocol's short schedule (300 iterations), on which the weight study runs
SHORT_SCHEDULE = ['--epochs', '15', '--iterations-per-epoch', '20', '--val-iterations', '2']


def log(msg: str) -> None:
    print(f'[gpu_suite {datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {msg}', flush=True)


def with_compile(env: Dict[str, str], flag) -> Dict[str, str]:
    """``flag`` None = nnU-Net's own default (variable unset: compiles on CUDA), else the given value."""
    env = dict(env)
    env.pop('nnUNet_compile', None)
    if flag is not None:
        env['nnUNet_compile'] = flag
    return env


def allows_compile(trainer: str) -> bool:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    try:
        cls = recursive_find_trainer_class_by_name(trainer)
    except Exception:
        return False
    return bool(getattr(cls, 'allow_torch_compile', True))


class Suite:
    def __init__(self, args):
        self.args = args
        self.started = time.time()
        self.record: Dict = {'device': args.device, 'smoke': args.smoke, 'steps': {},
                             'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                             'machine': self.machine()}

    def machine(self) -> Dict[str, str]:
        import platform
        import torch
        info = {'torch': torch.__version__, 'python': platform.python_version(), 'cores': str(os.cpu_count())}
        if self.args.device == 'cuda' and torch.cuda.is_available():
            info['gpu'] = torch.cuda.get_device_name(0)
        return info

    def minutes_left(self) -> float:
        return self.args.budget_minutes - (time.time() - self.started) / 60

    # ---------------------------------------------------------------------------------------------------- (a)
    def e2e(self) -> None:
        a = self.args
        work = os.path.join(a.work, 'e2e')
        env = nnunet_env(work)
        os.makedirs(work, exist_ok=True)
        logf = os.path.join(a.work, 'e2e.log')
        step = self.record['steps'].setdefault('e2e', {'runs': []})
        t0 = time.time()
        marker = os.path.join(work, 'prepared')
        if not os.path.exists(marker):
            make_synthetic_dataset(env['nnUNet_raw'], E2E_DATASET, 'GpuSuite', num_labeled=6, num_unlabeled=4,
                                   num_test=2, shape=(20, 32, 32) if a.smoke else (48, 64, 64), seed=3,
                                   overwrite=True)
            # tiny plans in smoke mode; on the GPU a bigger net and patch, still seconds per epoch
            if a.smoke:
                plan_and_preprocess_tiny(env, E2E_DATASET, ('3d_fullres',), log_file=logf)
            else:
                plan_and_preprocess_tiny(env, E2E_DATASET, ('3d_fullres',), features=(32, 64, 128, 256),
                                         patch_3d=(48, 64, 64), batch_size=2, log_file=logf)
            open(marker, 'w').close()
        step['prepare_s'] = time.time() - t0
        trainers = a.e2e_trainers or (E2E_TRAINERS[:1] if a.smoke else E2E_TRAINERS)
        epochs, iterations = (1, 2) if a.smoke else (2, 10)
        for trainer in trainers:
            variants = [('no compile', 'false')]
            if allows_compile(trainer):
                variants.append(('nnU-Net compile default', None))
            if a.smoke and a.device == 'cpu':
                # nnU-Net never compiles on a CPU: both variants would be the same run; keep the last one
                variants = variants[-1:]
            for label, compile_flag in variants:
                run = {'trainer': trainer, 'compile': label}
                t = time.time()
                train_env = with_compile(training_env(env, epochs, iterations, 1, final_validation=False),
                                         compile_flag)
                resume_env = with_compile(training_env(env, epochs + 1, iterations, 1, final_validation=False),
                                          compile_flag)
                out = os.path.join(work, 'pred', f'{trainer}_{"compile" if compile_flag is None else "plain"}')
                try:
                    base = ['nnUNetv2_train', str(E2E_DATASET), '3d_fullres', '0', '-tr', trainer, '-p',
                            'nnUNetPlansTiny', '-device', a.device]
                    run_step(base, train_env, logf)
                    run_step(base + ['--c'], resume_env, logf)
                    run_step(['nnUNetv2_predict', '-i', os.path.join(env['nnUNet_raw'], 'Dataset981_GpuSuite',
                                                                     'imagesTs'),
                              '-o', out, '-d', str(E2E_DATASET), '-c', '3d_fullres', '-f', '0', '-tr', trainer,
                              '-p', 'nnUNetPlansTiny', '-device', a.device, '-npp', '1', '-nps', '1',
                              '--disable_tta'], train_env, logf)
                    predicted = sorted(f for f in os.listdir(out) if f.endswith('.nii.gz'))
                    run['ok'] = len(predicted) == 2
                    run['detail'] = f'{len(predicted)} test cases predicted'
                except StepFailed as e:
                    run['ok'], run['detail'] = False, str(e)[-1500:]
                run['seconds'] = time.time() - t
                log(f'e2e {trainer} ({label}): {"ok" if run["ok"] else "FAILED"} in {run["seconds"]:.0f} s')
                step['runs'].append(run)
                self.save()

    # ---------------------------------------------------------------------------------------------------- (b)
    def cost(self) -> None:
        a = self.args
        out = os.path.join(a.work, 'iteration_cost.json')
        trainers = a.cost_trainers or (COST_TRAINERS[:1] if a.smoke else COST_TRAINERS)
        command = [sys.executable, os.path.join(HERE, 'iteration_cost.py'), '--device', a.device, '--trainers',
                   *trainers, '--json', out, '--work', os.path.join(a.work, 'itercost')]
        command += ['--plans', 'tiny', '--iterations', '2', '--warmup', '1', '--repeats', '1'] if a.smoke else \
            ['--iterations', '20', '--warmup', '5', '--repeats', '2']
        if not a.smoke:
            command += ['--markdown', a.markdown]
        t = time.time()
        proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8',
                              errors='replace')
        step = {'seconds': time.time() - t, 'ok': proc.returncode == 0 and os.path.isfile(out)}
        if step['ok']:
            with open(out) as f:
                step['results'] = json.load(f)['results']
        else:
            step['detail'] = proc.stdout[-2000:]
        log(f'iteration cost: {"ok" if step["ok"] else "FAILED"} in {step["seconds"]:.0f} s')
        self.record['steps']['iteration_cost'] = step
        self.save()

    # ---------------------------------------------------------------------------------------------------- (c), (d)
    def accuracy_runs(self, key: str, methods: List[str], seeds: List[int], schedule: List[str],
                      dataset: str = 'la') -> None:
        a = self.args
        step = self.record['steps'].setdefault(key, {'runs': [], 'skipped': []})
        step['schedule'] = 'smoke (1 epoch x 2 iterations)' if a.smoke else ' '.join(schedule)
        unit = None  # minutes of one supervised_a run on this schedule, once measured
        for seed in seeds:
            for method in methods:
                estimate = (unit or 0) * RELATIVE_COST.get(method, 5.0)
                if self.minutes_left() < max(estimate, 0.5):
                    step['skipped'].append({'method': method, 'seed': seed, 'estimate_min': estimate})
                    log(f'{key}: {method} seed {seed} skipped (estimated {estimate:.1f} min, '
                        f'{self.minutes_left():.1f} left)')
                    continue
                work = f'accuracy_seed{seed}' if dataset == 'la' else f'accuracy_{dataset}_seed{seed}'
                command = [sys.executable, os.path.join(HERE, 'accuracy.py'), '--dataset', dataset, '--device',
                           a.device, '--method', method, '--work', os.path.join(a.work, work)]
                command += ['--smoke'] if a.smoke else (schedule + ['--seed', str(seed)])
                t = time.time()
                proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding='utf-8',
                                      errors='replace')
                minutes = (time.time() - t) / 60
                if method == 'supervised_a' and proc.returncode == 0:
                    unit = minutes
                elif unit is None and proc.returncode == 0:
                    unit = minutes / RELATIVE_COST.get(method, 5.0)
                run = {'method': method, 'seed': seed, 'minutes': minutes, 'ok': proc.returncode == 0}
                if not run['ok']:
                    run['detail'] = proc.stdout[-2000:]
                log(f'{key}: {method} seed {seed}: {"ok" if run["ok"] else "FAILED"} in {minutes:.1f} min')
                step['runs'].append(run)
                self.save()

    # ---------------------------------------------------------------------------------------------------- output
    def save(self) -> None:
        a = self.args
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        tmp = a.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.record, f, indent=1)
        os.replace(tmp, a.json)
        self.render()

    def render(self) -> None:
        from iteration_cost import replace_section
        r, steps = self.record, self.record['steps']
        gpu = r['machine'].get('gpu', 'no GPU')
        lines = [f'### GPU validation suite ({r["device"]}{", smoke" if r["smoke"] else ""})', '',
                 f'`benchmarks/gpu_suite.py --device {r["device"]}{" --smoke" if r["smoke"] else ""}`, {r["date"]}, '
                 f'{gpu}, torch {r["machine"]["torch"]}. Results JSON: `{os.path.relpath(self.args.json, REPO)}`.', '']
        if 'e2e' in steps:
            lines += ['| end to end (AMP on CUDA): trainer | torch.compile | result | seconds |', '|---|---|---|---|']
            lines += [f'| {x["trainer"]} | {x["compile"]} | {"ok" if x["ok"] else "FAILED"}: '
                      f'{x["detail"].splitlines()[0] if x["ok"] else "see JSON"} | {x["seconds"]:.0f} |'
                      for x in steps['e2e']['runs']]
            lines.append('')
        if 'iteration_cost' in steps:
            s = steps['iteration_cost']
            if s['ok']:
                lines.append('Iteration cost: ' + ', '.join(
                    f'{x["trainer"]} {x["median_s"]:.3f} s/it, {x["peak_memory_mb"]:.0f} MB' for x in s['results'])
                    + ' (ratios in the iteration-cost section).')
            else:
                lines.append('Iteration cost: FAILED (see JSON).')
            lines.append('')
        for key, label in (('accuracy', 'Accuracy runs'), ('study', 'Weight study'),
                           ('accuracy_acdc', 'ACDC accuracy runs')):
            if key in steps:
                runs = steps[key]['runs']
                lines.append(f'{label} ({steps[key].get("schedule", "")}): ' + (', '.join(f'{x["method"]} seed {x["seed"]} '
                                                       f'{"ok" if x["ok"] else "FAILED"} ({x["minutes"]:.1f} min)'
                                                       for x in runs) or 'none') +
                             (('; skipped for time: ' + ', '.join(f'{x["method"]} seed {x["seed"]}'
                                                                   for x in steps[key]['skipped']))
                              if steps[key]['skipped'] else '') + '.')
                lines.append('')
        replace_section(self.args.markdown, f'gpu_suite:{r["device"]}', '\n'.join(lines).rstrip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', choices=('cuda', 'cpu'), default='cuda')
    p.add_argument('--part', choices=('all', '1', '2', '3'), default='all',
                   help='1: end to end + iteration cost; 2: LA accuracy + weight study; 3: ACDC accuracy; all: all three')
    p.add_argument('--smoke', action='store_true', help='every step, tiny (for a CPU test)')
    p.add_argument('--budget-minutes', dest='budget_minutes', type=float, default=None,
                   help=f'time budget; steps that would not fit are skipped and listed (default {PART_BUDGET_MIN} '
                        f'per part)')
    p.add_argument('--work', default=None, help='working folder (default: a temporary folder)')
    p.add_argument('--json', default=None, help='results JSON (default: benchmarks/results/gpu_suite_<device>.json; '
                                                'smoke: in the work folder)')
    p.add_argument('--markdown', default=None, help='markdown file (default docs/benchmarks.md; smoke: work folder)')
    p.add_argument('--e2e-trainers', dest='e2e_trainers', nargs='+', default=None)
    p.add_argument('--cost-trainers', dest='cost_trainers', nargs='+', default=None)
    p.add_argument('--accuracy-methods', dest='accuracy_methods', nargs='+', default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == 'cuda':
        import torch
        if not torch.cuda.is_available():
            print('--device cuda: no CUDA device is visible to torch (run with --device cpu --smoke to check the '
                  'steps on a CPU)', file=sys.stderr)
            return 2
    args.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix='semiseg_gpu_suite_'))
    os.makedirs(args.work, exist_ok=True)
    if args.json is None:
        args.json = os.path.join(args.work, 'gpu_suite_smoke.json') if args.smoke else \
            os.path.join(HERE, 'results', f'gpu_suite_{args.device}.json')
    if args.markdown is None:
        args.markdown = os.path.join(args.work, 'benchmarks_smoke.md') if args.smoke else \
            os.path.join(REPO, 'docs', 'benchmarks.md')
    parts = ['1', '2', '3'] if args.part == 'all' else [args.part]
    if args.budget_minutes is None:
        args.budget_minutes = PART_BUDGET_MIN * len(parts) if not args.smoke else 60.0
    suite = Suite(args)
    log(f'work folder {args.work}; parts {parts}; budget {args.budget_minutes:.1f} min')
    if '1' in parts:
        suite.e2e()
        suite.cost()
    if '2' in parts:
        methods = args.accuracy_methods or (['supervised_a', 'nnUNetTrainerMeanTeacher'] if args.smoke
                                            else ACCURACY_METHODS)
        suite.accuracy_runs('accuracy', methods, ACCURACY_SEEDS[:1] if args.smoke else ACCURACY_SEEDS,
                            LONG_SCHEDULE)
        if not args.smoke:
            suite.accuracy_runs('study', ['supervised_a'] + STUDY_TRAINERS, ACCURACY_SEEDS,
                                SHORT_SCHEDULE)
    if '3' in parts and not args.smoke:
        suite.accuracy_runs('accuracy_acdc', ACDC_METHODS, ACCURACY_SEEDS, LONG_SCHEDULE[:6], 'acdc')
    suite.save()
    failed = [x for s in suite.record['steps'].values() for x in s.get('runs', []) if not x['ok']] + \
        [k for k, s in suite.record['steps'].items() if 'ok' in s and not s['ok']]
    log(f'done in {(time.time() - suite.started) / 60:.1f} min; {len(failed)} failed step(s); JSON {args.json}')
    return 1 if failed else 0


if __name__ == '__main__':
    raise SystemExit(main())
