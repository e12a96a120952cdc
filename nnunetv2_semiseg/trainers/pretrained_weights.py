"""``nnUNetv2_train ... -tr <our trainer> -pretrained_weights <checkpoint>``.

nnU-Net's ``load_pretrained_weights`` asserts that every key of the network (except ``.seg_layers.``) exists in the
checkpoint. Our trainers' networks carry training-only heads (``heads.*``) and the dual-stream network keeps its
streams under ``stream_a.*`` / ``stream_b.*``, so a plain ``nnUNetTrainer`` checkpoint - nnU-Net's pretraining
flow - failed with an AssertionError. Here:

* the segmentation network (``encoder.*`` / ``decoder.*``) is taken from the checkpoint with nnU-Net's rules: same
  shapes required, segmentation layers not transferred (so a checkpoint of another label set can be used);
* training heads absent from the checkpoint keep their fresh initialisation (a checkpoint of the same trainer
  provides them), and the run says so;
* a dual-stream network gets the plain weights in stream A; stream B starts fresh (its architecture differs);
* extra state built from the student at ``initialize()`` (EMA teachers) is rebuilt from the loaded student, as for
  a plain checkpoint on ``--c``.

nnU-Net's ``run_training`` calls ``maybe_load_checkpoint`` as a module global; :func:`install` wraps it once so
that a trainer offering ``load_pretrained_weights(filename)`` gets the call, and every other trainer (and ``--c``,
``--val``) goes to nnU-Net's code unchanged. It runs when our trainers are imported, i.e. also in DDP children.
"""
import os
from typing import Dict, List, Tuple

import torch
from torch import nn

# nnU-Net's rule (run/load_pretrained_weights.py): segmentation layers are never transferred.
SKIPPED_IN_PRETRAINED = ('.seg_layers.',)
# Training-only modules that may be missing from a checkpoint (fresh initialisation kept).
TRAINING_ONLY_PREFIXES = ('heads.',)


class PretrainedWeightsError(RuntimeError):
    """The pretrained checkpoint does not fit the network. The message names the file, the key and the fix."""


def _strip_wrapper_prefixes(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # Checkpoints written outside nnU-Net's save_checkpoint may keep DDP's 'module.' / torch.compile's '_orig_mod.'.
    out = {}
    for key, value in weights.items():
        for prefix in ('module.', '_orig_mod.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _source_key_map(own_keys: List[str], pretrained: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """own key -> key to read in the checkpoint. Identity, except for a dual-stream network given a single-network
    checkpoint: stream A reads the plain ``encoder.*`` / ``decoder.*`` keys, stream B reads nothing."""
    streams = any(k.startswith('stream_a.') for k in own_keys)
    if streams and not any(k.startswith('stream_a.') for k in pretrained):
        return {k: k[len('stream_a.'):] for k in own_keys if k.startswith('stream_a.')}
    return {k: k for k in own_keys}


def select_pretrained_weights(own: Dict[str, torch.Tensor], pretrained: Dict[str, torch.Tensor], source: str
                              ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """(weights to load under the network's own keys, keys left at their fresh initialisation).

    Raises :class:`PretrainedWeightsError` if a segmentation-network key is missing or has another shape."""
    pretrained = _strip_wrapper_prefixes(pretrained)
    key_map = _source_key_map(list(own), pretrained)
    selected, fresh = {}, []
    for key, value in own.items():
        if any(s in key for s in SKIPPED_IN_PRETRAINED):
            fresh.append(key)
            continue
        source_key = key_map.get(key)
        if source_key is None or source_key not in pretrained:
            if source_key is None or key.startswith(TRAINING_ONLY_PREFIXES):
                fresh.append(key)
                continue
            raise PretrainedWeightsError(
                f'{source} has no weights for {source_key}: it was not trained with this network architecture '
                f'(same plans and configuration as this training, e.g. the plans transferred with '
                f'nnUNetv2_move_plans_between_datasets). Pretrain with the plans used here.')
        if tuple(pretrained[source_key].shape) != tuple(value.shape):
            raise PretrainedWeightsError(
                f'{source}: {source_key} has shape {tuple(pretrained[source_key].shape)}, this network expects '
                f'{tuple(value.shape)}: it was trained with other plans (patch size, features or number of input '
                f'channels). Pretrain with the plans used here.')
        selected[key] = pretrained[source_key]
    return selected, fresh


def describe_fresh(fresh: List[str]) -> str:
    """'heads.projector (4 tensors), segmentation layers (3 tensors)': the module groups left fresh."""
    groups: Dict[str, int] = {}
    for key in fresh:
        parts = key.split('.')
        if key.startswith(TRAINING_ONLY_PREFIXES):
            group = '.'.join(parts[:2])
        elif any(s in key for s in SKIPPED_IN_PRETRAINED):
            group = 'segmentation layers'
        else:
            group = parts[0]
        groups[group] = groups.get(group, 0) + 1
    # training heads first: they are what a user of -pretrained_weights asks about
    ordered = sorted(groups.items(), key=lambda item: not item[0].startswith(TRAINING_ONLY_PREFIXES))
    return ', '.join(f'{g} ({n} tensors)' for g, n in ordered)


def load_pretrained_weights_into_trainer(trainer, filename: str) -> None:
    """What ``-pretrained_weights`` does for our trainers (see the module docstring)."""
    from nnunetv2_semiseg.trainers.semi_supervised import unwrap_network
    from nnunetv2_semiseg.utilities.safe_io import load_torch_checkpoint
    if not trainer.was_initialized:
        trainer.initialize()
    checkpoint = load_torch_checkpoint(filename, 'cpu', 'Pass a complete checkpoint to -pretrained_weights.')
    if 'network_weights' not in checkpoint:
        raise PretrainedWeightsError(f'{filename} has no "network_weights": it is not an nnU-Net checkpoint '
                                     f'(checkpoint_final.pth or checkpoint_best.pth of a training).')
    network = unwrap_network(trainer.network)
    own = network.state_dict()
    selected, fresh = select_pretrained_weights(own, checkpoint['network_weights'], filename)
    own.update(selected)
    network.load_state_dict(own)
    # Teachers and similar state were copied from the random student in initialize(): rebuild them as for a
    # checkpoint without our state (a plain nnU-Net checkpoint on --c).
    trainer.load_semiseg_state(None)
    message = (f'Pretrained weights from {filename} ({checkpoint.get("trainer_name", "unknown trainer")}): '
               f'{len(selected)} of {len(own)} tensors loaded'
               + (f'; initialised fresh: {describe_fresh(fresh)}' if fresh else '') + '.')
    trainer.print_to_log_file(message)  # console and training log


def install() -> None:
    """Wrap nnU-Net's ``run_training.maybe_load_checkpoint`` once (idempotent)."""
    from nnunetv2.run import run_training
    original = run_training.maybe_load_checkpoint
    if getattr(original, '_semiseg_wrapped', False):
        return

    def maybe_load_checkpoint(nnunet_trainer, continue_training: bool, validation_only: bool,
                              pretrained_weights_file: str = None):
        if (pretrained_weights_file is not None and not continue_training and not validation_only
                and hasattr(nnunet_trainer, 'load_pretrained_weights')):
            nnunet_trainer.load_pretrained_weights(os.fspath(pretrained_weights_file))
            return
        # --c with -pretrained_weights (nnU-Net refuses it), --c, --val and other trainers: nnU-Net's own code.
        return original(nnunet_trainer, continue_training, validation_only, pretrained_weights_file)

    maybe_load_checkpoint._semiseg_wrapped = True
    maybe_load_checkpoint.__wrapped__ = original
    run_training.maybe_load_checkpoint = maybe_load_checkpoint
