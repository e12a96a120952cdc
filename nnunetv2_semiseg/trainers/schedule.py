"""Schedule overrides from environment variables, for short runs (tests, the demo, benchmarks).

nnU-Net's convention for a different schedule is a variant class (``nnUNetTrainer_5epochs``). Our trainers
additionally honour these variables so one trained class can be run on any schedule without a new class:

    nnUNet_semiseg_num_epochs                  -> num_epochs
    nnUNet_semiseg_iterations_per_epoch        -> num_iterations_per_epoch
    nnUNet_semiseg_val_iterations_per_epoch    -> num_val_iterations_per_epoch

    nnUNet_semiseg_seed                        -> seeds python, numpy and torch at trainer construction
    nnUNet_semiseg_skip_final_validation=1     -> no final validation after training (quick smoke runs; an
                                                  explicit ``--val`` run without the variable validates as usual)

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
    seed = os.environ.get('nnUNet_semiseg_seed')
    if seed is not None and seed.strip() != '':
        seed_everything(int(seed))
    # A checkpoint_latest more often than the run is long would never be written; keep nnU-Net's default else.
    trainer.save_every = min(trainer.save_every, max(1, trainer.num_epochs))


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

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)
