"""Schedule overrides from environment variables, for short runs (tests, the demo, benchmarks).

nnU-Net's convention for a different schedule is a variant class (``nnUNetTrainer_5epochs``). Our trainers
additionally honour these variables so one trained class can be run on any schedule without a new class:

    nnUNet_semiseg_num_epochs                  -> num_epochs
    nnUNet_semiseg_iterations_per_epoch        -> num_iterations_per_epoch
    nnUNet_semiseg_val_iterations_per_epoch    -> num_val_iterations_per_epoch

    nnUNet_semiseg_seed                        -> seeds python, numpy and torch at trainer construction
                                                  (under DDP rank r uses seed + r)
    nnUNet_semiseg_skip_final_validation=1     -> no final validation after training (quick smoke runs; an
                                                  explicit ``--val`` run without the variable validates as usual)
    nnUNet_semiseg_snapshot_epochs=15,25       -> also keep ``checkpoint_epoch<N>.pth`` after epoch N (1-based),
                                                  e.g. for a learning curve on test cases (the schedule study of
                                                  docs/benchmarks.md); each is a normal checkpoint that
                                                  ``nnUNetv2_predict -chk checkpoint_epoch<N>.pth`` loads

Ramp-ups are fractions of the total iterations, so they scale with the schedule.
"""
import os

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

SCHEDULE_ENV_VARS = {
    'num_epochs': 'nnUNet_semiseg_num_epochs',
    'num_iterations_per_epoch': 'nnUNet_semiseg_iterations_per_epoch',
    'num_val_iterations_per_epoch': 'nnUNet_semiseg_val_iterations_per_epoch',
}


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (in-process augmentation, i.e. nnUNet_n_proc_DA=0, is then repeatable)."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def apply_schedule_overrides(trainer) -> None:
    for attribute, variable in SCHEDULE_ENV_VARS.items():
        value = os.environ.get(variable)
        if value is None or value.strip() == '':
            continue
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f'Environment variable {variable}={value!r} must be a positive integer') from None
        if number < 1:
            raise ValueError(f'Environment variable {variable}={value!r} must be a positive integer')
        setattr(trainer, attribute, number)
    snapshot_epochs()  # a malformed snapshot list fails here, before any training
    seed = os.environ.get('nnUNet_semiseg_seed')
    if seed is not None and seed.strip() != '':
        # Offset by the DDP rank: with one seed everywhere every rank would draw the same cases and augmentations,
        # so a 2-GPU run would train twice on one batch instead of on two.
        seed_everything(int(seed) + (trainer.local_rank if trainer.is_ddp else 0))
    # A checkpoint_latest more often than the run is long would never be written; keep nnU-Net's default else.
    trainer.save_every = min(trainer.save_every, max(1, trainer.num_epochs))


SNAPSHOT_ENV_VAR = 'nnUNet_semiseg_snapshot_epochs'


def snapshot_epochs() -> frozenset:
    """The 1-based epoch counts of nnUNet_semiseg_snapshot_epochs (empty when unset)."""
    value = os.environ.get(SNAPSHOT_ENV_VAR, '').strip()
    if not value:
        return frozenset()
    epochs = set()
    for item in value.split(','):
        try:
            number = int(item)
        except ValueError:
            number = 0
        if number < 1:
            raise ValueError(f'Environment variable {SNAPSHOT_ENV_VAR}={value!r} must be a comma-separated list of '
                             f'positive epoch counts, e.g. 15,25')
        epochs.add(number)
    return frozenset(epochs)


def save_snapshot_if_requested(trainer) -> None:
    """After nnU-Net's on_epoch_end (which has advanced current_epoch to the number of epochs done): write
    checkpoint_epoch<N>.pth when N is listed in nnUNet_semiseg_snapshot_epochs."""
    done = trainer.current_epoch
    if done in snapshot_epochs():
        # save_checkpoint stores current_epoch + 1; step back one as nnU-Net's on_train_end does for
        # checkpoint_final, so the snapshot resumes (--c) and reports as 'done epochs' = N
        trainer.current_epoch -= 1
        try:
            trainer.save_checkpoint(os.path.join(trainer.output_folder, f'checkpoint_epoch{done}.pth'))
        finally:
            trainer.current_epoch += 1


def final_validation_skipped(trainer) -> bool:
    """True (and says so in the log) when nnUNet_semiseg_skip_final_validation is set to 1/true."""
    if os.environ.get('nnUNet_semiseg_skip_final_validation', '').strip().lower() in ('1', 'true', 'yes'):
        trainer.print_to_log_file('Final validation skipped: nnUNet_semiseg_skip_final_validation is set.')
        return True
    return False


class nnUNetTrainer_semisegSchedule(nnUNetTrainer):
    """Stock ``nnUNetTrainer`` (supervised, labeled cases only) that honours the schedule variables above.

    The supervised baseline of the demo and the benchmarks, so both arms run the same number of iterations.
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule_overrides(self)

    def on_epoch_end(self):
        super().on_epoch_end()
        save_snapshot_if_requested(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)
