"""The whole nnU-Net chain on a synthetic dataset, through the stock ``nnUNetv2_*`` commands plus ours.

Used by the demo, the benchmarks and the tests. Every step is a subprocess running the console script, exactly as
a user would type it, so the trainer search, strict checkpoint loading and CLI parsing are exercised for real.
"""
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from nnunetv2_semiseg.demo.synthetic import make_tiny_plans


class StepFailed(RuntimeError):
    pass


def nnunet_env(base: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment with nnUNet_raw/preprocessed/results under ``base``."""
    env = dict(os.environ)
    env['PYTHONIOENCODING'] = 'utf-8'  # children print UTF-8 progress bars; run_step decodes UTF-8
    env.update({'nnUNet_raw': os.path.join(base, 'nnUNet_raw'),
                'nnUNet_preprocessed': os.path.join(base, 'nnUNet_preprocessed'),
                'nnUNet_results': os.path.join(base, 'nnUNet_results')})
    if extra:
        env.update(extra)
    return env


def training_env(env: Dict[str, str], num_epochs: int, iterations_per_epoch: int, val_iterations: int = 1,
                 num_workers: int = 0, final_validation: bool = True) -> Dict[str, str]:
    """Env for training/prediction: schedule overrides and CPU-friendly worker counts.

    ``nnUNet_n_proc_DA=0`` runs augmentation in-process; it must not be set for planning (nnU-Net 2.8.1's
    planner calls torch.set_num_threads with it and crashes on 0).

    ``nnUNet_semiseg_allow_schedule_change=1``: these scripted short runs (the tests, the GPU suite) extend a
    finished run with ``--c`` and a longer schedule on purpose; without it ``--c`` refuses a changed schedule.
    """
    env = dict(env)
    env.update({'nnUNet_semiseg_num_epochs': str(num_epochs),
                'nnUNet_semiseg_iterations_per_epoch': str(iterations_per_epoch),
                'nnUNet_semiseg_val_iterations_per_epoch': str(val_iterations),
                'nnUNet_semiseg_allow_schedule_change': '1',
                'nnUNet_n_proc_DA': str(num_workers), 'nnUNet_def_n_proc': '1', 'nnUNet_compile': 'false'})
    if final_validation:
        env.pop('nnUNet_semiseg_skip_final_validation', None)
    else:
        env['nnUNet_semiseg_skip_final_validation'] = '1'
    return env


def run_step(command: Sequence[str], env: Dict[str, str], log_file: Optional[str] = None, echo: bool = False,
             timeout: Optional[float] = None, on_line: Optional[Callable[[str], None]] = None) -> str:
    """Run one console command; raise StepFailed with the tail of its output if it fails.

    ``on_line``: called with every output line as it arrives (the demo shows training progress with it); the
    command then runs unbuffered so that its lines are not held back until it exits."""
    started = time.time()
    if on_line is None:
        proc = subprocess.run(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              encoding='utf-8', errors='replace', timeout=timeout)
        output, returncode = proc.stdout, proc.returncode
    else:
        output, returncode = _run_streaming(command, dict(env, PYTHONUNBUFFERED='1'), timeout, on_line)
    if log_file is not None:
        with open(log_file, 'a') as f:
            f.write(f'$ {" ".join(command)}\n{output}\n')
    if echo:
        sys.stdout.write(output)
    if returncode != 0:
        tail = '\n'.join(output.splitlines()[-40:])
        raise StepFailed(f'Command failed (exit {returncode}, {time.time() - started:.0f} s): '
                         f'{" ".join(command)}\n{tail}')
    return output


def _run_streaming(command: Sequence[str], env: Dict[str, str], timeout: Optional[float],
                   on_line: Callable[[str], None]) -> Tuple[str, int]:
    proc = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            encoding='utf-8', errors='replace')
    timed_out = threading.Event()

    def stop():
        timed_out.set()
        proc.kill()

    # A timer, not a check between lines: a command that hangs silently must be stopped too.
    timer = threading.Timer(timeout, stop) if timeout is not None else None
    if timer is not None:
        timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            on_line(line.rstrip('\n'))
        returncode = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:   # on_line raised: do not leave the command running
            proc.kill()
            proc.wait()
    if timed_out.is_set():   # as subprocess.run(timeout=...) does
        raise subprocess.TimeoutExpired(list(command), timeout, output=''.join(lines))
    return ''.join(lines), returncode


def plan_and_preprocess_tiny(env: Dict[str, str], dataset_id: int, configurations: Sequence[str] = ('3d_fullres',),
                             plans_name: str = 'nnUNetPlansTiny', features=(8, 16, 32), patch_3d=(16, 32, 32),
                             patch_2d=(32, 32), batch_size: int = 2, log_file: Optional[str] = None) -> None:
    """Stock fingerprint + planning, a shrunken copy of the plans, stock preprocessing, our unlabeled step."""
    planning_env = dict(env)
    planning_env.pop('nnUNet_n_proc_DA', None)
    run_step(['nnUNetv2_extract_fingerprint', '-d', str(dataset_id), '-np', '1', '--verify_dataset_integrity'],
             planning_env, log_file)
    run_step(['nnUNetv2_plan_experiment', '-d', str(dataset_id)], planning_env, log_file)
    # The planner just created nnUNet_preprocessed/DatasetXXX_Name: find it there rather than through nnU-Net's
    # lookup, which reads the paths from os.environ instead of ``env``.
    matches = glob.glob(os.path.join(env['nnUNet_preprocessed'], f'Dataset{dataset_id:03d}_*'))
    if len(matches) != 1:
        raise StepFailed(f'Expected one preprocessed folder Dataset{dataset_id:03d}_* in '
                         f'{env["nnUNet_preprocessed"]}, found {matches}')
    base = matches[0]
    with open(os.path.join(base, 'nnUNetPlans.json')) as f:
        plans = json.load(f)
    tiny = make_tiny_plans(plans, plans_name, features, patch_3d, patch_2d, batch_size)
    with open(os.path.join(base, plans_name + '.json'), 'w') as f:
        json.dump(tiny, f, indent=2)
    run_step(['nnUNetv2_preprocess', '-d', str(dataset_id), '-plans_name', plans_name, '-c', *configurations,
              '-np', *(['1'] * len(configurations))], planning_env, log_file)
    run_step(['nnUNetv2_semiseg_preprocess_unlabeled', '-d', str(dataset_id), '-c', *configurations,
              '-plans_name', plans_name, '-np', '1'], planning_env, log_file)


def train(env: Dict[str, str], dataset_id: int, configuration: str, fold, trainer: str, plans_name: str,
          device: str = 'cpu', extra_args: Sequence[str] = (), log_file: Optional[str] = None,
          on_line: Optional[Callable[[str], None]] = None) -> float:
    started = time.time()
    run_step(['nnUNetv2_train', str(dataset_id), configuration, str(fold), '-tr', trainer, '-p', plans_name,
              '-device', device, *extra_args], env, log_file, on_line=on_line)
    return time.time() - started


def predict(env: Dict[str, str], input_folder: str, output_folder: str, dataset_id: int, configuration: str,
            fold, trainer: str, plans_name: str, device: str = 'cpu', disable_tta: bool = True,
            log_file: Optional[str] = None) -> None:
    command = ['nnUNetv2_predict', '-i', input_folder, '-o', output_folder, '-d', str(dataset_id), '-c',
               configuration, '-f', str(fold), '-tr', trainer, '-p', plans_name, '-device', device,
               '-npp', '0', '-nps', '0']
    if disable_tta:
        command.append('--disable_tta')
    run_step(command, env, log_file)


def copy_tree_fresh(src: str, dst: str) -> None:
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
