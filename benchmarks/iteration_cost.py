"""Iteration cost of each trainer relative to ``nnUNetTrainer`` on the same plans, measured in one run.

For every trainer a fresh subprocess builds the trainer in-process (``on_train_start``: network, optimizer,
loss, data loaders), pre-fetches a few labeled and unlabeled batches and then cycles through them, so the timing
covers the training step itself (forward, backward, optimizer step, EMA/memory updates), not data augmentation,
which nnU-Net runs in background workers. Reported: median seconds per iteration after warm-up, and peak memory:
the subprocess' peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.

Usage (defaults: a synthetic dataset built in a temporary folder, nnU-Net's default 3d_fullres plans for it):

    python benchmarks/iteration_cost.py [--trainers nnUNetTrainer nnUNetTrainerMeanTeacher ...]
        [--device cpu|cuda] [--iterations 10] [--warmup 3] [--plans default|tiny] [--work DIR]
        [--markdown docs/benchmarks.md]

With ``--markdown`` the results table replaces the section between
``<!-- iteration_cost:<device>:begin -->`` and ``<!-- iteration_cost:<device>:end -->`` of that file.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

DATASET_ID = 991
DEFAULT_TRAINERS = ['nnUNetTrainer', 'nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet', 'nnUNetTrainerVoxelAdversarial',
                    'nnUNetTrainerFLPM', 'nnUNetTrainerSSNetFLPM', 'nnUNetTrainerDualStream',
                    'nnUNetTrainerDualStream_releasedCode', 'nnUNetTrainerBCP', 'nnUNetTrainerBCP_noPretrain']
# The second baseline: stock nnUNetTrainer on plans whose batch size is doubled (the labeled + unlabeled rows a
# semi-supervised student sees). A CPU's cost per step grows faster than the batch (measured: 4 patches cost 2.41x
# 2 patches), so a method's own cost is its ratio to this row, not to nnUNetTrainer.
TWICE_BATCH = 'nnUNetTrainer@2xbatch'
BASELINES = ['nnUNetTrainer', TWICE_BATCH]


def prepare_dataset(work: str, plans: str) -> str:
    from nnunetv2_semiseg.demo.pipeline import nnunet_env, plan_and_preprocess_tiny, run_step
    from nnunetv2_semiseg.demo.synthetic import make_synthetic_dataset
    env = nnunet_env(work)
    plans_name = 'nnUNetPlans' if plans == 'default' else 'nnUNetPlansTiny'
    marker = os.path.join(work, f'prepared_{plans_name}')
    if os.path.exists(marker):
        return plans_name
    make_synthetic_dataset(env['nnUNet_raw'], DATASET_ID, 'IterCost', num_labeled=6, num_unlabeled=6, num_test=0,
                           shape=(32, 48, 48), seed=0, overwrite=True)
    if plans == 'tiny':
        plan_and_preprocess_tiny(env, DATASET_ID, ('3d_fullres',))
    else:
        planning_env = dict(env)
        planning_env.pop('nnUNet_n_proc_DA', None)
        run_step(['nnUNetv2_plan_and_preprocess', '-d', str(DATASET_ID), '-c', '3d_fullres', '-np', '1', '-npfp',
                  '1'], planning_env)
        run_step(['nnUNetv2_semiseg_preprocess_unlabeled', '-d', str(DATASET_ID), '-c', '3d_fullres', '-np', '1'],
                 planning_env)
    open(marker, 'w').close()
    return plans_name


def measure_in_this_process(trainer_name: str, plans_name: str, device: str, iterations: int, warmup: int) -> dict:
    """Runs inside the per-trainer subprocess."""
    import itertools
    import resource

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    torch.manual_seed(0)
    dataset = convert_id_to_dataset_name(DATASET_ID)
    plans = load_json(os.path.join(nnUNet_preprocessed, dataset, plans_name + '.json'))
    plans['continue_training'] = False
    dataset_json = load_json(os.path.join(nnUNet_preprocessed, dataset, 'dataset.json'))
    if trainer_name == TWICE_BATCH:
        plans['configurations']['3d_fullres']['batch_size'] *= 2
        cls = recursive_find_trainer_class_by_name('nnUNetTrainer')
    else:
        cls = recursive_find_trainer_class_by_name(trainer_name)
    trainer = cls(plans, '3d_fullres', 0, dataset_json, torch.device(device))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    labeled = [next(trainer.dataloader_train) for _ in range(4)]
    trainer.dataloader_train = itertools.cycle(labeled)
    if getattr(trainer, 'dataloader_unlabeled', None) is not None:
        unlabeled = [next(trainer.dataloader_unlabeled) for _ in range(4)]
        trainer.dataloader_unlabeled = itertools.cycle(unlabeled)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + iterations):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if device == 'cuda':
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    # Floating-point operations of one whole training step (forward, backward, extra passes), counted by torch:
    # independent of machine load, unlike the seconds.
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as flop_counter:
        trainer.train_step(next(trainer.dataloader_train))
    result = {'trainer': trainer_name, 'median_s': statistics.median(times),
              'gflops_per_step': flop_counter.get_total_flops() / 1e9, 'min_s': min(times),
              'max_s': max(times), 'iterations': iterations, 'warmup': warmup,
              'batch_size': trainer.batch_size,
              'unlabeled_batch_size': getattr(trainer, 'unlabeled_batch_size_per_rank', None),
              'patch_size': list(trainer.configuration_manager.patch_size)}
    if device == 'cuda':
        result['peak_memory_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
        result['memory_kind'] = 'torch.cuda.max_memory_allocated'
    else:
        result['peak_memory_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result['memory_kind'] = 'peak RSS of the process'
    return result


def machine_description(device: str) -> str:
    if device == 'cuda':
        import torch
        return f'{torch.cuda.get_device_name(0)}, torch {torch.__version__}'
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            names = [line.split(':', 1)[1].strip() for line in f if line.startswith('model name')]
        if names:
            cpu = names[0]
    except OSError:
        pass
    import torch
    return f'{os.cpu_count()}-core CPU ({cpu}), torch {torch.__version__} ({torch.get_num_threads()} threads)'


def ratio(value, reference) -> float:
    return value / reference if reference else float('nan')


def markdown_table(results, device, plans_name, machine) -> str:
    base = next((r for r in results if r['trainer'] == 'nnUNetTrainer'), None)
    twice = next((r for r in results if r['trainer'] == TWICE_BATCH), None)
    first = base or results[0]
    lines = [f'Machine: {machine}. Device: {device}. Plans: `{plans_name}` 3d_fullres, patch '
             f'{first["patch_size"]}, labeled batch {first["batch_size"]}. '
             f'Median of {results[0]["iterations"]} iterations after {results[0]["warmup"]} warm-up, fastest of '
             f'{results[0]["repeats"]} interleaved repeats per trainer; '
             f'measured {time.strftime("%Y-%m-%d")}.', '',
             '| trainer | s / iteration (median) | ratio to nnUNetTrainer | ratio to nnUNetTrainer, 2x batch | '
             'GFLOP / step | FLOP ratio | FLOP ratio, 2x batch | peak memory (MB) | memory ratio | '
             'memory ratio, 2x batch |',
             '|---|---|---|---|---|---|---|---|---|---|']
    get = lambda r, key: r.get(key) if r else None  # noqa: E731
    for r in results:
        flops = r.get('gflops_per_step', float('nan'))
        lines.append(f'| {r["trainer"]} | {r["median_s"]:.3f} | {ratio(r["median_s"], get(base, "median_s")):.2f}x | '
                     f'{ratio(r["median_s"], get(twice, "median_s")):.2f}x | {flops:.1f} | '
                     f'{ratio(flops, get(base, "gflops_per_step")):.2f}x | '
                     f'{ratio(flops, get(twice, "gflops_per_step")):.2f}x | {r["peak_memory_mb"]:.0f} | '
                     f'{ratio(r["peak_memory_mb"], get(base, "peak_memory_mb")):.2f}x | '
                     f'{ratio(r["peak_memory_mb"], get(twice, "peak_memory_mb")):.2f}x |')
    lines.append('')
    lines.append(f'Memory: {results[0]["memory_kind"]}. `{TWICE_BATCH}` = stock `nnUNetTrainer` on the same plans '
                 f'with the batch size doubled (the labeled + unlabeled rows a semi-supervised student sees): a '
                 f"method's cost bound is stated against it, because a CPU's cost per step grows faster than the "
                 f'batch.')
    return '\n'.join(lines)


def replace_section(path: str, key: str, content: str) -> None:
    begin, end = f'<!-- {key}:begin -->', f'<!-- {key}:end -->'
    text = open(path).read() if os.path.isfile(path) else '# Benchmarks\n'
    block = f'{begin}\n{content}\n{end}'
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r'.*?' + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip('\n') + '\n\n' + block + '\n'
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--trainers', nargs='+', default=DEFAULT_TRAINERS)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--iterations', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--repeats', type=int, default=2,
                        help='Measure every trainer this many times, interleaved (A B C A B C ...), and keep the '
                             'fastest median: robust to other load on a shared machine')
    parser.add_argument('--plans', default='default', choices=['default', 'tiny'])
    parser.add_argument('--work', default=None, help='Working folder (default: temporary)')
    parser.add_argument('--json', default=None, help='Write the raw results to this JSON file')
    parser.add_argument('--markdown', default=None, help='Update the results section of this markdown file')
    parser.add_argument('--_measure', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--_plans_name', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args._measure:  # child mode
        print('RESULT ' + json.dumps(measure_in_this_process(args._measure, args._plans_name, args.device,
                                                              args.iterations, args.warmup)))
        return

    from nnunetv2_semiseg.demo.pipeline import nnunet_env
    work = args.work or tempfile.mkdtemp(prefix='semiseg_itercost_')
    plans_name = prepare_dataset(work, args.plans)
    env = nnunet_env(work, {'nnUNet_n_proc_DA': '0', 'nnUNet_def_n_proc': '1', 'nnUNet_compile': 'false'})
    trainers = BASELINES + [t for t in args.trainers if t not in BASELINES]
    best = {}
    for name in [t for _ in range(args.repeats) for t in trainers]:
        print(f'measuring {name} ...', flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--_measure', name, '--_plans_name',
                               plans_name, '--device', args.device, '--iterations', str(args.iterations),
                               '--warmup', str(args.warmup)], env=env, capture_output=True, encoding='utf-8',
                              errors='replace')
        line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
        if proc.returncode != 0 or not line:
            print(f'  FAILED:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}', file=sys.stderr)
            continue
        r = json.loads(line[-1][len('RESULT '):])
        print(f'  {r["median_s"]:.3f} s/it, peak {r["peak_memory_mb"]:.0f} MB', flush=True)
        r['repeats'] = best.get(name, {}).get('repeats', 0) + 1
        if name not in best or r['median_s'] < best[name]['median_s']:
            best[name] = r
        else:
            best[name]['repeats'] = r['repeats']
    results = [best[t] for t in trainers if t in best]
    if not results:
        sys.exit('no trainer could be measured')
    table = markdown_table(results, args.device, plans_name, machine_description(args.device))
    print()
    print(table)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'device': args.device, 'plans': plans_name, 'results': results}, f, indent=2)
    if args.markdown:
        replace_section(args.markdown, f'iteration_cost:{args.device}', table)


if __name__ == '__main__':
    main()
