"""``nnUNetTrainerSemiSupervised``: what every semi-supervised trainer of this package shares.

A method trainer only implements :meth:`compute_loss_terms` (its paper's loss equation) and, if it has extra
state, :meth:`after_optimizer_step`, :meth:`semiseg_state` / :meth:`load_semiseg_state` and
:meth:`extra_modules_for_mode_switch`. This base owns:

* the unlabeled data loader (same augmentation as the labeled one, random crops, optional two views);
* batch composition (labeled batch from the plans, ``unlabeled_batch_size`` per rank under DDP);
* the training fraction used by ramp-ups (:mod:`nnunetv2_semiseg.trainers.ramps`);
* AMP (CUDA autocast + GradScaler), gradient clipping and the optimizer step, as in nnU-Net's ``train_step``;
* per-term loss logging (``train_<term>``, one value per epoch), ``progress_terms.png`` and a ``progress.png``
  whose training curve is the supervised part of the loss;
* extra checkpoint state under ``checkpoint['semiseg']``, restored on ``--c`` (absent key tolerated), with the
  schedule record that ``--c`` compares (:func:`~nnunetv2_semiseg.trainers.schedule.check_resume_schedule`);
* the start-of-run summary in the log (cases, batches, each term's weight and ramp, class attributes) and each
  ramped term's current weight next to its loss every epoch.
"""
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import autocast, nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.collate_outputs import collate_outputs
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context

from nnunetv2_semiseg.data.preprocess_unlabeled import (RECORD_FILENAME, describe_differences,
                                                        preprocessing_fingerprint, preprocessing_settings,
                                                        read_record, unlabeled_folder_name, unlabeled_set_mismatch)
from nnunetv2_semiseg.data.unlabeled_loader import UnlabeledDataLoader, load_unlabeled_dataset
from nnunetv2_semiseg.networks.semiseg_network import SemiSegNetwork
from nnunetv2_semiseg.trainers import pretrained_weights
from nnunetv2_semiseg.trainers.run_guards import (NonFiniteLossGuard, check_resume_trainer,
                                                  describe_non_finite_weights, non_finite_tensors)
from nnunetv2_semiseg.trainers.schedule import (add_schedule_to_debug_json, apply_schedule_overrides,
                                                check_resume_schedule, describe_schedule, final_validation_skipped,
                                                save_snapshot_if_requested, schedule_record)
from nnunetv2_semiseg.utilities.progress_logger import SemiSupervisedLocalLogger, SupervisedCurve


pretrained_weights.install()  # routes -pretrained_weights of nnUNetv2_train to load_pretrained_weights below


class MissingUnlabeledDataError(RuntimeError):
    pass


def unwrap_network(network: nn.Module) -> nn.Module:
    """The plain module behind DDP and torch.compile wrappers."""
    if isinstance(network, DDP):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def split_batch_size_over_ranks(global_batch_size: int, world_size: int, rank: int) -> int:
    """Per-rank share of a global batch size (the first ``global % world`` ranks get one more)."""
    if global_batch_size < world_size:
        raise ValueError(f'unlabeled_batch_size={global_batch_size} is smaller than the number of GPUs '
                         f'({world_size}); every rank needs at least one unlabeled sample.')
    return global_batch_size // world_size + (1 if rank < global_batch_size % world_size else 0)


def is_ramped(component) -> bool:
    return component.ramp(0.0) != component.ramp(1.0)


def describe_ramp(component, total_iterations: int) -> str:
    """A component's ramp in words, from the component itself (its ramp() and ramp_length), so that it stays true
    for components written later."""
    if not is_ramped(component):
        return 'no ramp'
    start = component.ramp(0.0)
    if abs(start - math.exp(-5.0)) < 1e-12:
        kind = 'sigmoid ramp exp(-5(1-t)^2)'
    elif start == 0.0:
        kind = 'linear ramp'
    else:
        kind = 'ramp'
    length = getattr(component, 'ramp_length', None)
    if length is None:
        return f'{kind} (factor {start:.4g} at the start, 1 at the end)'
    return (f'{kind} over the first {length:.0%} of training ({int(round(length * total_iterations))} of '
            f'{total_iterations} steps; factor {start:.4g} at the start)')


class nnUNetTrainerSemiSupervised(nnUNetTrainer):
    # Global number of unlabeled patches per step; None = the plans' batch size (per rank: the labeled share).
    unlabeled_batch_size: Optional[int] = None
    # Two views per unlabeled patch sharing the spatial transform, differing in intensity transforms.
    unlabeled_two_views: bool = False
    # Names of the loss terms returned by compute_loss_terms (besides 'loss'); logged as train_<name>.
    loss_term_names: Sequence[str] = ('sup',)
    # The training curve of progress.png; None: derived from loss_term_names (utilities/progress_logger.py).
    progress_supervised_curve: Optional[SupervisedCurve] = None
    # torch.compile (nnU-Net's default on CUDA) of the student. Methods that pass a Python callable through the
    # forward (``train_fn``) should switch it off: a new closure per step would defeat the compiled graph's guards.
    allow_torch_compile: bool = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # nnU-Net's __init__ pops this flag (set by nnUNetv2_train --c); keep it: only --c compares schedules.
        continuing = bool(plans.get('continue_training', False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.continuing_training = continuing
        apply_schedule_overrides(self)
        self.dataloader_unlabeled = None
        self.unlabeled_batch_size_per_rank: Optional[int] = None
        self.global_iteration = 0  # optimizer steps done; the ramp-ups read it
        self.non_finite_guard = NonFiniteLossGuard(trainer_name=type(self).__name__)
        self.unlabeled_folder = os.path.join(self.preprocessed_dataset_folder_base,
                                             unlabeled_folder_name(self.configuration_manager.data_identifier))
        # progress.png: the supervised part of the training loss against the validation loss, not the total.
        self.logger.local_logger = SemiSupervisedLocalLogger.replacing(
            self.logger.local_logger, self.loss_term_names, self.progress_supervised_curve)
        for key in self.term_log_keys():
            self.logger.local_logger.my_fantastic_logging[key] = []

    # ----------------------------------------------------------------------------------------------------------
    # network
    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels,
                                   num_output_channels, enable_deep_supervision: bool = True) -> nn.Module:
        # A classmethod (not static) so variants can read class attributes; the predictor calls it on the class.
        base = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                        num_output_channels, enable_deep_supervision)
        return SemiSegNetwork(base, cls.build_training_heads(base, num_output_channels))

    @classmethod
    def build_training_heads(cls, base_network: nn.Module, num_output_channels: int) -> Optional[nn.Module]:
        """Trainable modules that share the student's forward pass (kept in network_weights as ``heads.*``)."""
        return None

    def _do_i_compile(self) -> bool:
        return self.allow_torch_compile and super()._do_i_compile()

    @property
    def unwrapped_network(self) -> SemiSegNetwork:
        return unwrap_network(self.network)

    # ----------------------------------------------------------------------------------------------------------
    # nnUNetv2_train -pretrained_weights (nnU-Net's loader rejects the heads; see trainers/pretrained_weights.py)
    def load_pretrained_weights(self, filename: str) -> None:
        pretrained_weights.load_pretrained_weights_into_trainer(self, filename)

    # ----------------------------------------------------------------------------------------------------------
    # data
    def initialize(self):
        super().initialize()
        if self.unlabeled_batch_size is None:
            self.unlabeled_batch_size_per_rank = self.batch_size
        elif self.is_ddp:
            self.unlabeled_batch_size_per_rank = split_batch_size_over_ranks(
                self.unlabeled_batch_size, dist.get_world_size(), dist.get_rank())
        else:
            self.unlabeled_batch_size_per_rank = self.unlabeled_batch_size

    def preprocess_unlabeled_command(self) -> str:
        dataset_id = self.plans_manager.dataset_name.split('_')[0].replace('Dataset', '')
        return (f'nnUNetv2_semiseg_preprocess_unlabeled -d {int(dataset_id)} -c {self.configuration_name} '
                f'-plans_name {self.plans_manager.plans_name}')

    def check_unlabeled_folder(self) -> None:
        folder = self.unlabeled_folder
        if not os.path.isdir(folder) or not any(f.endswith('.b2nd') for f in os.listdir(folder)):
            raise MissingUnlabeledDataError(
                f'{type(self).__name__} needs preprocessed unlabeled data in {folder}, which '
                f'{"is empty" if os.path.isdir(folder) else "does not exist"}. Put the unlabeled images in '
                f'nnUNet_raw/{self.plans_manager.dataset_name}/imagesUnlabeled/ and run:\n    '
                f'{self.preprocess_unlabeled_command()}')
        record = read_record(folder)
        expected = preprocessing_fingerprint(self.plans_manager.plans, self.configuration_name)
        if record is None or record.get('preprocessing_fingerprint') != expected:
            differences = '' if record is None else ' (' + describe_differences(
                record.get('preprocessing'), preprocessing_settings(self.plans_manager.plans,
                                                                    self.configuration_name)) + ')'
            raise MissingUnlabeledDataError(
                f'{folder} was not preprocessed with the plans of this training '
                f'({self.plans_manager.plans_name}, {self.configuration_name}): its {RECORD_FILENAME} '
                f'{"is missing" if record is None else "names other preprocessing"}{differences}. Re-create it '
                f'with:\n    '
                f'{self.preprocess_unlabeled_command()} --overwrite')

    def warn_if_unlabeled_set_changed(self) -> None:
        # Images added to (or removed from) imagesUnlabeled/ after preprocessing would otherwise go unnoticed.
        from nnunetv2.paths import nnUNet_raw
        if nnUNet_raw:
            warning = unlabeled_set_mismatch(self.unlabeled_folder,
                                             os.path.join(nnUNet_raw, self.plans_manager.dataset_name),
                                             self.dataset_json['file_ending'], self.preprocess_unlabeled_command())
            if warning:
                self.print_to_log_file(f'WARNING: {warning}')

    def get_unlabeled_dataloader(self):
        if self.is_cascaded:
            raise NotImplementedError('Semi-supervised training of cascade stages would need previous-stage '
                                      'predictions for the unlabeled cases; use 2d or 3d_fullres/3d_lowres.')
        self.check_unlabeled_folder()
        self.warn_if_unlabeled_set_changed()
        dataset = load_unlabeled_dataset(self.unlabeled_folder)
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        patch_size = self.configuration_manager.patch_size
        # Same pipeline as the labeled loader (a subclass that overrides get_training_transforms is honoured),
        # minus label-only steps: no deep-supervision targets, regions or cascade inputs.
        transforms = self.get_training_transforms(
            patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = UnlabeledDataLoader(dataset, self.unlabeled_batch_size_per_rank, initial_patch_size, patch_size,
                                     self.label_manager, transforms=transforms, two_views=self.unlabeled_two_views)
        num_processes = get_allowed_n_proc_DA()
        if num_processes == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, max(1, num_processes // 2),
                                            num_cached=max(3, num_processes // 2), seeds=None,
                                            pin_memory=self.device.type == 'cuda', wait_time=0.002)

    def get_dataloaders(self):
        # Unlabeled first (it checks its folder), so a missing folder fails before the labeled workers start.
        self.dataloader_unlabeled = self.get_unlabeled_dataloader()
        dataloader_train, dataloader_val = super().get_dataloaders()
        _ = next(self.dataloader_unlabeled)
        return dataloader_train, dataloader_val

    def next_unlabeled_batch(self) -> Dict[str, torch.Tensor]:
        batch = next(self.dataloader_unlabeled)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def perform_actual_validation(self, save_probabilities: bool = False):
        if not final_validation_skipped(self):
            super().perform_actual_validation(save_probabilities)

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabeled, NonDetMultiThreadedAugmenter):
            self.dataloader_unlabeled._finish()
        self.dataloader_unlabeled = None

    # ----------------------------------------------------------------------------------------------------------
    # schedule helpers
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def training_fraction(self) -> float:
        """Fraction of the optimizer steps of the whole schedule done before the current step."""
        return self.global_iteration / max(1, self.total_iterations())

    # ----------------------------------------------------------------------------------------------------------
    # losses
    @staticmethod
    def labeled_rows(output, num_labeled: int):
        """The first ``num_labeled`` rows of a network output (a deep-supervision list or one tensor)."""
        if isinstance(output, (list, tuple)):
            return [o[:num_labeled] for o in output]
        return output[:num_labeled]

    @staticmethod
    def full_resolution(output) -> torch.Tensor:
        return output[0] if isinstance(output, (list, tuple)) else output

    def supervised_loss(self, seg_outputs, target) -> torch.Tensor:
        """nnU-Net's (deep-supervised) DC+CE / DC+BCE on the labeled rows."""
        return self.loss(seg_outputs, target)

    def rows_to_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or sigmoid per region for region-based datasets; always float32."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)

    def rows_to_hard_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Argmax class map (b, *spatial), or binary region maps (b, regions, *spatial) for region datasets."""
        if self.label_manager.has_regions:
            return (torch.sigmoid(logits.float()) > 0.5).long()
        return logits.argmax(1)

    def compute_loss_terms(self, data: torch.Tensor, target, unlabeled: Dict[str, torch.Tensor]
                           ) -> Dict[str, torch.Tensor]:
        """Return {'loss': total, <term>: value for term in loss_term_names}. Runs under CUDA autocast."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Hook after every optimizer step (EMA teachers, memory banks...)."""

    # ----------------------------------------------------------------------------------------------------------
    # training step
    def train_step(self, batch: dict) -> dict:
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        unlabeled = self.next_unlabeled_batch()

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            terms = self.compute_loss_terms(data, target, unlabeled)
        loss = terms['loss']
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        self.global_iteration += 1
        self.after_optimizer_step()
        missing = [t for t in self.loss_term_names if t not in terms]
        if missing:
            raise KeyError(f'{type(self).__name__}.compute_loss_terms did not return the term(s) {missing}')
        logged = {'loss': loss.detach().cpu().numpy(),
                  **{t: terms[t].detach().float().cpu().numpy() for t in self.loss_term_names}}
        self.non_finite_guard.check_step(logged, self.current_epoch, uses_amp=self.grad_scaler is not None)
        return logged

    # ----------------------------------------------------------------------------------------------------------
    # train/eval switching of extra modules
    def extra_modules_for_mode_switch(self) -> List[nn.Module]:
        """Modules outside self.network that train together with it (a teacher stays in eval: not listed)."""
        return []

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.global_iteration = self.current_epoch * self.num_iterations_per_epoch
        for m in self.extra_modules_for_mode_switch():
            m.train()

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        for m in self.extra_modules_for_mode_switch():
            m.eval()

    # ----------------------------------------------------------------------------------------------------------
    # logging
    def term_log_keys(self) -> List[str]:
        return [f'train_{t}' for t in self.loss_term_names]

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        outputs = collate_outputs(train_outputs)
        for term, key in zip(self.loss_term_names, self.term_log_keys()):
            values = np.asarray(outputs[term], dtype=np.float64)
            if self.is_ddp:
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, values)
                value = float(np.mean(np.concatenate([np.atleast_1d(g) for g in gathered])))
            else:
                value = float(np.mean(values))
            self.logger.log(key, value, self.current_epoch)

    def on_epoch_end(self):
        weights = self.current_term_weights()
        for term, key in zip(self.loss_term_names, self.term_log_keys()):
            value = np.round(self.logger.get_value(key, step=-1), decimals=4)
            if term in weights:
                self.print_to_log_file(f'train_{term}', value, f'(weight {weights[term]:.4g})')
            else:
                self.print_to_log_file(f'train_{term}', value)
        super().on_epoch_end()  # draws progress.png and progress_terms.png (SemiSupervisedLocalLogger)
        save_snapshot_if_requested(self)

    # ----------------------------------------------------------------------------------------------------------
    # what a run says about itself: set-up at the start, ramped weights every epoch, schedule in debug.json
    def get_tr_and_val_datasets(self):
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        # Kept for the start-of-run summary (nnU-Net only logs the split's sizes inside do_split).
        self.num_labeled_training_cases = len(dataset_tr.identifiers)
        self.num_validation_cases = len(dataset_val.identifiers)
        return dataset_tr, dataset_val

    def on_train_start(self):
        super().on_train_start()
        for line in self.run_setup_lines():
            self.print_to_log_file(line)

    def _save_debug_information(self):
        super()._save_debug_information()
        add_schedule_to_debug_json(self)

    def loss_components_for_logging(self) -> list:
        """The weighted unsupervised components of a composed trainer (empty for trainers that compute their terms
        in one method, like BCP)."""
        return list(getattr(self, 'loss_components', None) or [])

    def epoch_last_step(self) -> int:
        """The epoch's last optimizer step (at epoch end global_iteration already counts the next one)."""
        return max(0, self.global_iteration - 1)

    def current_term_weights(self) -> Dict[str, float]:
        """Weight of every ramped term at the epoch's last optimizer step (constant weights are in the set-up)."""
        fraction = self.epoch_last_step() / max(1, self.total_iterations())
        return {c.name: c.weight_at(fraction) for c in self.loss_components_for_logging() if is_ramped(c)}

    def term_weight_lines(self) -> List[str]:
        """One line per loss term: its weight and ramp. A trainer without components lists its terms only; its
        weights are among the hyperparameters line."""
        total = self.total_iterations()
        components = self.loss_components_for_logging()
        if not components:
            return [f'Loss terms (logged as train_<term>): {", ".join(self.loss_term_names)}; their weights are '
                    f'class attributes (hyperparameters below).']
        lines = ['Loss term sup: nnU-Net\'s supervised loss on the labeled rows, weight 1, no ramp.']
        for c in components:
            lines.append(f'Loss term {c.name}: weight {c.weight:g}, {describe_ramp(c, total)}.')
        return lines

    def hyperparameter_line(self) -> str:
        """The trainer's class attributes below nnU-Net's trainer (a variant's changed values show up here)."""
        values = {}
        for klass in reversed(type(self).__mro__):
            if not issubclass(klass, nnUNetTrainerSemiSupervised):
                continue
            for name, value in vars(klass).items():
                if name.startswith('_') or name == 'loss_term_names' or callable(value) or \
                        isinstance(value, (property, staticmethod, classmethod)):
                    continue
                values[name] = getattr(self, name)
        return 'Hyperparameters (class attributes): ' + ', '.join(f'{k}={v!r}' for k, v in sorted(values.items()))

    def run_setup_lines(self) -> List[str]:
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        num_unlabeled = len(nnUNetDatasetBlosc2.get_identifiers(self.unlabeled_folder))
        unlabeled_setting = (f'unlabeled_batch_size={self.unlabeled_batch_size}' if self.unlabeled_batch_size
                             is not None else 'unlabeled_batch_size=None: the plans\' batch size')
        per_rank = ' per GPU' if self.is_ddp else ''
        lines = [f'Semi-supervised run of {type(self).__name__}: '
                 f'{getattr(self, "num_labeled_training_cases", "?")} labeled training cases '
                 f'(fold {self.fold}; {getattr(self, "num_validation_cases", "?")} validation cases), '
                 f'{num_unlabeled} unlabeled cases ({self.unlabeled_folder}).',
                 f'Batch per step{per_rank}: {self.batch_size} labeled + {self.unlabeled_batch_size_per_rank} '
                 f'unlabeled patches ({unlabeled_setting}'
                 f'{", two views each" if self.unlabeled_two_views else ""}).',
                 describe_schedule(self)]
        return lines + self.term_weight_lines() + [self.hyperparameter_line()]

    def _restore_term_log_keys(self):
        """After loading a logger from a checkpoint that lacks our keys (plain nnU-Net), pad them with NaN."""
        logging = self.logger.local_logger.my_fantastic_logging
        num_epochs_logged = len(logging.get('train_losses', []))
        for key in self.term_log_keys():
            values = logging.setdefault(key, [])
            values.extend([float('nan')] * (num_epochs_logged - len(values)))

    # ----------------------------------------------------------------------------------------------------------
    # checkpoints
    def semiseg_state(self) -> dict:
        """Extra state saved under checkpoint['semiseg']; subclasses add their keys (call super)."""
        return {'global_iteration': self.global_iteration, 'schedule': schedule_record(self)}

    def load_semiseg_state(self, state: Optional[dict]) -> None:
        """Restore :meth:`semiseg_state`. ``state`` is None for checkpoints without the key (plain nnU-Net)."""
        if state is not None:
            self.global_iteration = int(state.get('global_iteration', self.global_iteration))

    def save_checkpoint(self, filename: str) -> None:
        # Re-implemented because the base method has no hook for extra keys. Written to a temporary name and
        # renamed, so an interruption never leaves a truncated checkpoint behind.
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        weights = self.unwrapped_network.state_dict()
        bad = non_finite_tensors(weights)
        if bad:  # a diverged network must not replace a good checkpoint
            self.print_to_log_file(f'No checkpoint written to {filename}: '
                                   f'{describe_non_finite_weights(bad, len(weights))}.')
            return
        checkpoint = {
            'network_weights': weights,
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            'semiseg': self.semiseg_state(),
        }
        tmp = filename + '.tmp'
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)

    def check_resume_schedule(self, checkpoint: dict, source: str) -> None:
        """``--c`` only: refuse a checkpoint trained on another schedule (schedule.check_resume_schedule). Loading for
        ``--val`` or from Python compares nothing: validation does not depend on the schedule."""
        state = checkpoint.get('semiseg')
        if not self.continuing_training or state is None:  # None: a plain nnU-Net warm start, not our schedule
            return
        check_resume_schedule(state.get('schedule'), self, source)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # Re-implemented: nnU-Net 2.8.1's version fails for dicts and knows nothing of checkpoint['semiseg'].
        if not self.was_initialized:
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            from nnunetv2_semiseg.utilities.safe_io import load_torch_checkpoint
            # --c tries checkpoint_final, then checkpoint_latest, then checkpoint_best (nnU-Net's run_training).
            checkpoint = load_torch_checkpoint(
                filename_or_checkpoint, self.device,
                'To continue from the next checkpoint, move this file out of the fold folder (--c then takes '
                'checkpoint_latest.pth, else checkpoint_best.pth); or train the fold from scratch without --c.')
        else:
            checkpoint = filename_or_checkpoint
        source = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else 'The checkpoint'
        check_resume_trainer(checkpoint, type(self).__name__, source)
        self.check_resume_schedule(checkpoint, source)
        network = self.unwrapped_network
        own_keys = set(network.state_dict().keys())
        weights = {}
        for key, value in checkpoint['network_weights'].items():
            if key not in own_keys and key.startswith('module.'):
                key = key[len('module.'):]
            weights[key] = value
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._restore_term_log_keys()
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        if checkpoint.get('semiseg') is None:
            # A plain nnU-Net checkpoint has no heads: load what exists, keep the fresh heads.
            missing, unexpected = network.load_state_dict(weights, strict=False)
            if unexpected or any(not k.startswith('heads.') for k in missing):
                raise RuntimeError(f'Checkpoint does not fit {type(self).__name__}: missing {missing}, '
                                   f'unexpected {unexpected}')
        else:
            network.load_state_dict(weights)
        try:
            self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        except ValueError:
            # Only reachable from a plain checkpoint whose optimizer knew no heads: their momentum starts at zero.
            self.print_to_log_file('Optimizer state does not match the network with heads; starting it fresh.')
        if self.grad_scaler is not None and checkpoint.get('grad_scaler_state') is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])
        self.global_iteration = self.current_epoch * self.num_iterations_per_epoch
        self.load_semiseg_state(checkpoint.get('semiseg'))
