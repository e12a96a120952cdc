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
    nnUNet_semiseg_bcp_switch_checkpoint=1     -> BCP trainers also write ``checkpoint_switch.pth`` at the phase
                                                  switch (the student the EMA teacher starts from), e.g. to
                                                  measure the teacher's first pseudo-labels (docs/bcp.md)

Ramp-ups are fractions of the total iterations, so they scale with the schedule.

Because these variables change a run without changing its output folder, every run prints them at its start, and
our semi-supervised trainers record them (and the schedule they produced) in ``checkpoint['semiseg']['schedule']``
and in ``debug.json``. ``nnUNetv2_train --c`` refuses to continue a checkpoint on another number of epochs or
iterations per epoch, naming both values and the way out; ``nnUNet_semiseg_allow_schedule_change=1`` extends a run
on purpose. Checkpoints written before the record existed load as before.
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


SEED_ENV_VAR = 'nnUNet_semiseg_seed'
ALLOW_SCHEDULE_CHANGE_ENV = 'nnUNet_semiseg_allow_schedule_change'
# The attributes whose change alters what a resumed run trains (its length, hence every ramp-up, which is a fraction
# of all iterations). The validation iterations and the seed only change the pseudo-Dice estimate and the random
# stream: a difference there is logged, not refused.
RESUME_CHECKED_ATTRIBUTES = ('num_epochs', 'num_iterations_per_epoch')


class ScheduleChangedError(RuntimeError):
    """``--c`` under a schedule other than the one the checkpoint was trained with."""


def schedule_environment() -> dict:
    """The schedule variables as set now (None = unset), the seed included."""
    names = list(SCHEDULE_ENV_VARS.values()) + [SEED_ENV_VAR]
    values = {}
    for name in names:
        value = os.environ.get(name)
        values[name] = None if value is None or value.strip() == '' else value.strip()
    return values


def schedule_record(trainer) -> dict:
    """What the checkpoint and debug.json keep: the variables and the schedule they produced."""
    return {'environment': schedule_environment(),
            'effective': {attribute: int(getattr(trainer, attribute)) for attribute in SCHEDULE_ENV_VARS}}


def describe_schedule(trainer) -> str:
    """One log line for the start of a run (the variables change a run without changing its output folder)."""
    attribute_of = {v: k for k, v in SCHEDULE_ENV_VARS.items()}
    shown = []
    for variable, value in schedule_environment().items():
        if value is None:
            continue
        attribute = attribute_of.get(variable)
        actual = getattr(trainer, attribute) if attribute else None
        if attribute and str(actual) != value:
            # A hand-written variant that sets the attribute after super().__init__ wins over the variable.
            shown.append(f'{variable}={value} (not in effect: the trainer sets {attribute}={actual})')
        else:
            shown.append(f'{variable}={value}')
    overrides = ', '.join(shown) if shown else 'none (no nnUNet_semiseg_* schedule variable set)'
    return (f'Schedule: {trainer.num_epochs} epochs x {trainer.num_iterations_per_epoch} iterations '
            f'({trainer.num_epochs * trainer.num_iterations_per_epoch} optimizer steps), '
            f'{trainer.num_val_iterations_per_epoch} validation iterations per epoch. Environment overrides: '
            f'{overrides}.')


def _shown(variable: str, value) -> str:
    return f'{variable}={value}' if value is not None else f'{variable} unset'


def check_resume_schedule(record, trainer, source: str) -> None:
    """Refuse ``--c`` when the checkpoint was trained on another schedule (see RESUME_CHECKED_ATTRIBUTES).

    ``record`` is :func:`schedule_record` of the run that wrote the checkpoint; None for checkpoints written before
    the record existed (they load as before). ``nnUNet_semiseg_allow_schedule_change=1`` accepts a change on purpose
    (extending a finished run): it is written to the log.
    """
    if not record:
        trainer.print_to_log_file(f'{source} holds no schedule record (an older checkpoint): the schedule is not '
                                  f'compared.')
        return
    saved_env, saved = record.get('environment', {}), record.get('effective', {})
    now_env = schedule_environment()
    changed = [a for a in RESUME_CHECKED_ATTRIBUTES
               if a in saved and int(saved[a]) != int(getattr(trainer, a))]
    for name in [SCHEDULE_ENV_VARS['num_val_iterations_per_epoch'], SEED_ENV_VAR]:
        if saved_env.get(name) != now_env.get(name):
            trainer.print_to_log_file(f'Note: {_shown(name, saved_env.get(name))} when {source} was written, '
                                      f'{_shown(name, now_env.get(name))} now.')
    if not changed:
        return
    lines = []
    for attribute in changed:
        variable = SCHEDULE_ENV_VARS[attribute]
        lines.append(f'{attribute}: {saved[attribute]} in the checkpoint '
                     f'({_shown(variable, saved_env.get(variable))}), '
                     f'{getattr(trainer, attribute)} now ({_shown(variable, now_env.get(variable))})')
    if os.environ.get(ALLOW_SCHEDULE_CHANGE_ENV, '').strip() == '1':
        trainer.print_to_log_file(f'Continuing {source} on a changed schedule ({ALLOW_SCHEDULE_CHANGE_ENV}=1): '
                                  + '; '.join(lines) + '. Ramp-ups follow the new total.')
        return
    to_restore = []
    for attribute in changed:
        variable = SCHEDULE_ENV_VARS[attribute]
        value = saved_env.get(variable)
        to_restore.append(f'export {variable}={value}' if value is not None else f'unset {variable}')
    raise ScheduleChangedError(
        f'{source} was trained on another schedule than this run would continue it with: ' + '; '.join(lines)
        + '. Continuing (--c) would change that run in its output folder (its length and every ramp-up, which '
          'are fractions of all iterations). To continue it as it was trained: ' + ' and '.join(to_restore)
        + '. To train the new schedule, use another output folder (another nnUNet_results, or a variant class '
          'with its own name). To extend this run on purpose: ' + f'{ALLOW_SCHEDULE_CHANGE_ENV}=1.')


def add_schedule_to_debug_json(trainer) -> None:
    """nnU-Net's debug.json stores attributes as strings; add the schedule record as real JSON next to them."""
    import json
    if trainer.local_rank != 0:
        return
    path = os.path.join(trainer.output_folder, 'debug.json')
    if not os.path.isfile(path):
        return
    with open(path) as f:
        debug = json.load(f)
    debug['semiseg_schedule'] = schedule_record(trainer)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(debug, f, sort_keys=False, indent=4)
    os.replace(tmp, path)


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
    seed = os.environ.get(SEED_ENV_VAR)
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


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to 1 / true / yes (any case)."""
    return os.environ.get(name, '').strip().lower() in ('1', 'true', 'yes')


SWITCH_CHECKPOINT_ENV_VAR = 'nnUNet_semiseg_bcp_switch_checkpoint'
SWITCH_CHECKPOINT = 'checkpoint_switch.pth'


def final_validation_skipped(trainer) -> bool:
    """True (and says so in the log) when nnUNet_semiseg_skip_final_validation is set to 1/true."""
    if env_flag('nnUNet_semiseg_skip_final_validation'):
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

    def on_train_start(self):
        super().on_train_start()
        self.print_to_log_file(describe_schedule(self))

    def _save_debug_information(self):
        super()._save_debug_information()
        add_schedule_to_debug_json(self)

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)
