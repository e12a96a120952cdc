"""Run nnU-Net's own DDP entry (``nnunetv2.run.run_training.run_ddp``) on CPU: gloo instead of NCCL, 2 processes.

Patched, in the spawned ranks only, are device selection and the backend, nothing of this package:

* ``run_training.setup_ddp`` initialises a gloo group (once: several trainers run one after another in the same
  ranks, so the group outlives one ``run_ddp`` call and ``cleanup_ddp`` is deferred to the end of the worker);
* ``torch.cuda.set_device`` is a no-op and the trainer's device is ``cpu`` (``nnUNetTrainer.__init__`` hard-codes
  ``cuda:<rank>`` under DDP; its CUDA GradScaler goes with it);
* ``DistributedDataParallel(..., device_ids=[rank])`` drops ``device_ids`` for CPU modules (torch refuses them).

Everything else is read-only spying: which cases each loader drew, which files ``torch.save`` wrote, the trainer
object ``run_ddp`` built (to read its state after training). Each rank writes ``<trainer>.rank<r>.pt`` with what it
saw; the test compares the ranks.
"""
import hashlib
import os
import traceback
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist


def _to_cpu(obj):
    """A state dict (nested dicts/lists of tensors and numbers) detached onto the CPU, for comparing ranks."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def install_patches(spy: Dict[str, list]) -> None:
    from torch.nn.parallel import DistributedDataParallel
    from nnunetv2.run import run_training
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2_semiseg.data.unlabeled_loader import UnlabeledDataLoader

    def setup_ddp(rank, world_size):
        if not dist.is_initialized():
            # a short timeout: a rank that fails must not leave the other one waiting in a collective for 30 min
            dist.init_process_group('gloo', rank=rank, world_size=world_size, timeout=timedelta(seconds=240))

    run_training.setup_ddp = setup_ddp
    run_training.cleanup_ddp = lambda: None
    torch.cuda.set_device = lambda *_a, **_k: None

    original_ddp_init = DistributedDataParallel.__init__

    def ddp_init(self, module, device_ids=None, *args, **kwargs):
        if all(p.device.type == 'cpu' for p in module.parameters()):
            device_ids = None
        original_ddp_init(self, module, device_ids, *args, **kwargs)

    DistributedDataParallel.__init__ = ddp_init

    original_get_trainer = run_training.get_trainer_from_args

    def get_trainer_from_args(*args, **kwargs):
        kwargs['device'] = torch.device('cpu')
        trainer = original_get_trainer(*args, **kwargs)
        trainer.device = torch.device('cpu')
        trainer.grad_scaler = None
        spy['trainer'].append(trainer)
        return trainer

    run_training.get_trainer_from_args = get_trainer_from_args

    def spying(cls, key):
        original = cls.generate_train_batch

        def generate_train_batch(self):
            batch = original(self)
            spy[key].append((list(batch['keys']), tuple(batch['data'].shape),
                             hashlib.sha1(batch['data'].numpy().tobytes()).hexdigest()[:12]))
            return batch
        cls.generate_train_batch = generate_train_batch

    spying(nnUNetDataLoader, 'labeled')
    spying(UnlabeledDataLoader, 'unlabeled')   # a subclass: its own override is wrapped as well

    original_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            spy['saved'].append(os.fspath(f))
        return original_save(obj, f, *args, **kwargs)

    torch.save = save


def probe_input(patch_size) -> torch.Tensor:
    """The fixed input on which a rank's trained network and the one-process predictor are compared."""
    return torch.randn(1, 1, *patch_size, generator=torch.Generator().manual_seed(0))


def trained_network_output(trainer) -> torch.Tensor:
    """The rank's network as it stands after training / ``--c``, in inference form (eval, no deep supervision)."""
    from nnunetv2_semiseg.trainers.semi_supervised import unwrap_network
    trainer.set_deep_supervision_enabled(False)
    network = unwrap_network(trainer.network)
    network.eval()
    with torch.no_grad():
        return network(probe_input(trainer.configuration_manager.patch_size)).detach().clone()


def trainer_report(trainer, spy: Dict[str, list]) -> dict:
    from nnunetv2_semiseg.trainers.semi_supervised import unwrap_network
    state = _to_cpu(unwrap_network(trainer.network).state_dict())
    return {
        'output': trained_network_output(trainer),
        'network': state,
        'semiseg': _to_cpu(trainer.semiseg_state()),
        'batch_size': trainer.batch_size,
        'unlabeled_batch_size_per_rank': trainer.unlabeled_batch_size_per_rank,
        'labeled': list(spy['labeled']),
        'unlabeled': list(spy['unlabeled']),
        'saved': list(spy['saved']),
        'global_iteration': trainer.global_iteration,
    }


def gathered_statistics(rank: int) -> dict:
    """The cross-rank statistics, computed by the package's functions on per-rank inputs of different sizes, plus
    the inputs (the test recomputes them in one process on the concatenation)."""
    from nnunetv2_semiseg.losses.prototypes import gather_selected_across_ranks, select_prototypes
    from nnunetv2_semiseg.networks.flpm import batch_spread, instance_statistics
    generator = torch.Generator().manual_seed(7)
    # the same draws on every rank; each rank keeps its own slice: rank 0 two samples, rank 1 one
    features = torch.randn(3, 4, 5, 6, 6, generator=generator)
    candidates, scores = torch.randn(7, 4, generator=generator), torch.rand(7, generator=generator)
    rows = slice(0, 2) if rank == 0 else slice(2, 3)
    candidate_rows = slice(0, 4) if rank == 0 else slice(4, 7)
    mean, std = instance_statistics(features[rows])
    kept, kept_scores = select_prototypes(candidates[candidate_rows], scores[candidate_rows], 3)
    memory = select_prototypes(*gather_selected_across_ranks(kept, kept_scores, 3), 3)
    return {'spread': (batch_spread(mean), batch_spread(std)), 'memory': memory, 'own_selection': kept,
            'inputs': (features, candidates, scores)}


def worker(rank: int, world_size: int, port: int, out_dir: str, dataset_id: str, plans: str,
           configuration: str, runs: List[tuple]) -> None:
    """``runs``: (trainer name, continue_training, report name) in order, all in this one process group."""
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    torch.set_num_threads(1)
    spy = {'trainer': [], 'labeled': [], 'unlabeled': [], 'saved': []}
    install_patches(spy)
    from nnunetv2.run import run_training
    try:
        for name, continue_training, report_name in runs:
            for v in spy.values():
                v.clear()
            try:
                # the real DDP entry: trainer lookup, --c checkpoint loading, initialize (DDP wrap),
                # run_training, final validation
                run_training.run_ddp(rank, dataset_id, configuration, 0, name, plans, False, continue_training,
                                     False, None, False, False, world_size)
                report = trainer_report(spy['trainer'][0], spy)
            except Exception:
                report = {'error': traceback.format_exc()}
            torch.save(report, os.path.join(out_dir, f'{report_name}.rank{rank}.pt'))
            dist.barrier()
        torch.save(gathered_statistics(rank), os.path.join(out_dir, f'statistics.rank{rank}.pt'))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Every report is on disk and the process group is gone: leave without the interpreter's teardown. On some
    # machines a rank aborts there ("terminate called without an active exception": a native thread still joinable
    # at exit), after all its work, and mp.spawn reports the whole run as failed. An exception above still
    # propagates (this line is not reached) and fails the fixture.
    os._exit(0)
