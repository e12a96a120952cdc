"""nnU-Net's real multi-GPU path (``nnUNetv2_train ... -num_gpus 2`` = ``run_ddp`` in 2 spawned ranks) for every
trainer, on CPU with gloo (``tests/ddp_gloo_harness.py`` says what is patched: the backend and the device only).

One spawn of 2 ranks runs all trainers one after another (1 epoch of 2 iterations each, tiny plans), then resumes
one of them with ``--c``; the tests compare what the ranks saw.

Batch split under DDP (what the batch-size test pins down): nnU-Net divides the plans' global batch size over the
ranks (the first ``global % world`` ranks get one more sample) and re-derives foreground oversampling per rank. The
unlabeled batch is ``unlabeled_batch_size`` split the same way, or, when it is None, the rank's labeled share. The
tiny plans have batch size 2, so each of the 2 ranks trains on 1 labeled and 1 unlabeled patch per step.

``nnUNet_semiseg_seed`` is set for the run: a repeatable run must still give every rank its own draws."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from ddp_gloo_harness import probe_input, worker

TRAINERS = ['nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet', 'nnUNetTrainerFLPM', 'nnUNetTrainerSSNetFLPM',
            'nnUNetTrainerVoxelAdversarial', 'nnUNetTrainerDualStream', 'nnUNetTrainerDualStream_releasedCode',
            'nnUNetTrainerBCP', 'nnUNetTrainerBCPFLPM']
# trainers with state besides the step counter in checkpoint['semiseg'] (FLPM and DualStream keep everything in
# the network)
STATEFUL = {'nnUNetTrainerMeanTeacher', 'nnUNetTrainerSSNet', 'nnUNetTrainerSSNetFLPM', 'nnUNetTrainerVoxelAdversarial',
            'nnUNetTrainerBCP', 'nnUNetTrainerBCPFLPM'}
RESUMED = 'nnUNetTrainerBCP'      # the trainer with the most extra state (phase, teacher, mask seed)
WORLD = 2
ITERATIONS = 2
PLANS_BATCH_SIZE = 2


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
def ddp_run(tiny_dataset, tmp_path_factory):
    ws = tiny_dataset.copy_to(str(tmp_path_factory.mktemp('ddp_ws')))
    out = tmp_path_factory.mktemp('ddp_reports')
    env = {k: v for k, v in ws.train_env(epochs=1, iterations=ITERATIONS, val_iterations=1).items()
           if k.startswith('nnUNet')}
    env['nnUNet_semiseg_seed'] = '1234'
    runs = [(name, False, name) for name in TRAINERS] + [(RESUMED, True, RESUMED + '_resumed')]
    saved_env = dict(os.environ)
    os.environ.update(env)   # inherited by the spawned ranks
    try:
        mp.spawn(worker, args=(WORLD, _free_port(), str(out), str(ws.dataset_id), ws.plans, '3d_fullres', runs),
                 nprocs=WORLD, join=True)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    reports = {}
    for _, _, name in runs:
        reports[name] = [torch.load(out / f'{name}.rank{r}.pt', weights_only=False) for r in range(WORLD)]
        for r, rep in enumerate(reports[name]):
            assert 'error' not in rep, f'{name} rank {r}:\n{rep["error"]}'
    statistics = [torch.load(out / f'statistics.rank{r}.pt', weights_only=False) for r in range(WORLD)]
    return ws, reports, statistics


@pytest.mark.parametrize('name', TRAINERS)
def test_weights_and_method_state_identical_across_ranks(ddp_run, name):
    """Student (with DualStream's two streams and SS-Net's/FLPM's heads), and checkpoint['semiseg']: EMA teachers,
    SS-Net's prototype memory, BCP's phase, teacher and mask seed, the voxel discriminator and its Adam."""
    _, reports, _ = ddp_run
    r0, r1 = reports[name]
    assert r0['global_iteration'] == r1['global_iteration'] == ITERATIONS
    assert _differences(r0['network'], r1['network'], 'network') == []
    assert _differences(r0['semiseg'], r1['semiseg'], 'semiseg') == []
    if name in STATEFUL:   # the method state was really compared, not just the step counter
        assert len(r0['semiseg']) > 1


@pytest.mark.parametrize('name', TRAINERS)
def test_per_rank_batches_are_the_ddp_split_and_differ_between_ranks(ddp_run, name):
    _, reports, _ = ddp_run
    for rep in reports[name]:
        assert rep['batch_size'] == PLANS_BATCH_SIZE // WORLD
        assert rep['unlabeled_batch_size_per_rank'] == PLANS_BATCH_SIZE // WORLD
        # the loader's warm-up batch + one per iteration, each of the per-rank size
        assert [shape[0] for _, shape, _ in rep['unlabeled']] == [PLANS_BATCH_SIZE // WORLD] * (ITERATIONS + 1)
        assert {shape[0] for _, shape, _ in rep['labeled']} == {PLANS_BATCH_SIZE // WORLD}
    r0, r1 = reports[name]
    # no step trains on a copy of the other rank's unlabeled patch, and the labeled draws are not in lockstep
    assert all(a[2] != b[2] for a, b in zip(r0['unlabeled'], r1['unlabeled']))
    assert [k for k, _, _ in r0['labeled']] != [k for k, _, _ in r1['labeled']]


@pytest.mark.parametrize('name', TRAINERS)
def test_rank_zero_alone_writes_the_checkpoint(ddp_run, name):
    ws, reports, _ = ddp_run
    r0, r1 = reports[name]
    assert r1['saved'] == []
    fold = os.path.join(ws.model_folder(name), 'fold_0')
    assert os.path.join(fold, 'checkpoint_final.pth.tmp') in r0['saved']
    checkpoint = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert _differences(checkpoint['network_weights'], r0['network'], 'network_weights') == []


def test_resume_with_c_in_two_ranks_restores_the_checkpoint_on_every_rank(ddp_run):
    """``--c`` after the final epoch: both ranks load checkpoint_final (written by rank 0 alone) and hold exactly
    the state rank 0 trained, including the per-rank-drawn parts made common (BCP's mask seed)."""
    _, reports, _ = ddp_run
    trained = reports[RESUMED][0]
    for rep in reports[RESUMED + '_resumed']:
        assert rep['global_iteration'] == ITERATIONS
        assert _differences(rep['network'], trained['network'], 'network') == []
        assert _differences(rep['semiseg'], trained['semiseg'], 'semiseg') == []
    assert reports[RESUMED + '_resumed'][1]['saved'] == []


def _one_process_prediction(model_folder: str) -> torch.Tensor:
    """What nnUNetv2_predict builds from the model folder in one process (network from the plans, strict load of
    checkpoint_final.pth), run on the probe input."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, ('0',), 'checkpoint_final.pth')
    network = predictor.network
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    with torch.no_grad():
        return network(probe_input(predictor.configuration_manager.patch_size))


@pytest.mark.parametrize('name', TRAINERS)
def test_checkpoint_predicts_in_one_process_exactly_like_the_ranks(ddp_run, name, one_torch_thread):
    """The DDP checkpoint (rank 0's) loaded by the one-process predictor gives bit for bit the output both ranks'
    networks give; for the trainer resumed with --c in 2 ranks, so do the resumed ranks' networks."""
    ws, reports, _ = ddp_run
    expected = _one_process_prediction(ws.model_folder(name))
    runs = [name] + ([RESUMED + '_resumed'] if name == RESUMED else [])
    for run in runs:
        for r, rep in enumerate(reports[run]):
            assert torch.equal(rep['output'], expected), (run, r, (rep['output'] - expected).abs().max().item())
    assert expected.abs().max() > 0


def test_gathered_statistics_equal_one_process_on_the_concatenated_batch(ddp_run):
    """FLPM's batch spread and SS-Net's memory selection see the global batch: ranks holding 2 and 1 samples give
    what one process (this one: no process group, the single-GPU code path) gives on all 3. The DualStream entropy
    percentile, by contrast, is per rank by design (README, Multi-GPU)."""
    from nnunetv2_semiseg.losses.prototypes import select_prototypes
    from nnunetv2_semiseg.networks.flpm import batch_spread, instance_statistics
    _, _, statistics = ddp_run
    features, candidates, scores = statistics[0]['inputs']
    mean, std = instance_statistics(features)
    single_rows, single_scores = select_prototypes(candidates, scores, 3)
    for s in statistics:
        for got, expected in zip(s['spread'], (batch_spread(mean), batch_spread(std))):
            assert torch.allclose(got, expected, atol=1e-6) and bool((expected > 0).all())
        assert torch.equal(s['memory'][0], single_rows) and torch.equal(s['memory'][1], single_scores)
    # a rank alone would have had another memory: rank 1's single candidates are not the global top 3
    assert not torch.equal(statistics[1]['own_selection'], single_rows)
