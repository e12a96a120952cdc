"""nnU-Net's real multi-GPU path (``nnUNetv2_train ... -num_gpus 2`` = ``run_ddp`` in 2 spawned ranks) for every
trainer, on CPU with gloo (see ``tests/ddp_gloo_harness.py`` for the only things patched: backend and device).

One spawn of 2 ranks runs all trainers one after another (1 epoch of 2 iterations each, tiny plans) and the test
then compares what the ranks saw."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ddp_gloo_harness import worker

TRAINERS = ['nnUNetTrainerMeanTeacher']
WORLD = 2
ITERATIONS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _differences(a, b, path=''):
    """Paths at which two nested states differ (tensors compared exactly)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
            torch.equal(a, b)
        return [] if ok else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f'{path}: keys {sorted(set(a) ^ set(b))}']
        return [d for k in a for d in _differences(a[k], b[k], f'{path}/{k}')]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f'{path}: lengths']
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f'{path}[{i}]')]
    return [] if a == b else [f'{path}: {a!r} != {b!r}']


@pytest.fixture(scope='module')
def ddp_reports(tiny_dataset, tmp_path_factory):
    import shutil
    base = str(tmp_path_factory.mktemp('ddp_ws'))
    for sub in ('nnUNet_raw', 'nnUNet_preprocessed'):
        shutil.copytree(os.path.join(tiny_dataset.base, sub), os.path.join(base, sub), symlinks=True)
    os.makedirs(os.path.join(base, 'nnUNet_results'))
    from conftest import Workspace
    ws = Workspace(base)
    out = tmp_path_factory.mktemp('ddp_reports')
    env = ws.train_env(epochs=1, iterations=ITERATIONS, val_iterations=1)
    saved_env = dict(os.environ)
    os.environ.update({k: v for k, v in env.items() if k.startswith('nnUNet')})   # inherited by the spawned ranks
    try:
        mp.spawn(worker, args=(WORLD, _free_port(), str(out), str(ws.dataset_id), ws.plans, '3d_fullres', TRAINERS),
                 nprocs=WORLD, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    reports = {}
    for name in TRAINERS:
        reports[name] = [torch.load(out / f'{name}.rank{r}.pt', weights_only=False) for r in range(WORLD)]
        for r, rep in enumerate(reports[name]):
            assert 'error' not in rep, f'{name} rank {r}:\n{rep["error"]}'
    return ws, reports


@pytest.mark.parametrize('name', TRAINERS)
def test_weights_and_method_state_identical_across_ranks(ddp_reports, name):
    _, reports = ddp_reports
    r0, r1 = reports[name]
    assert r0['global_iteration'] == r1['global_iteration'] == ITERATIONS
    assert _differences(r0['network'], r1['network'], 'network') == []
    assert _differences(r0['semiseg'], r1['semiseg'], 'semiseg') == []
