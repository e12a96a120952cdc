"""``nnUNetv2_semiseg_export_plain``: turn a model trained with our trainers into a plain nnU-Net model.

The output folder (``dataset.json``, ``plans.json``, ``fold_X/checkpoint_final.pth``) is predicted by stock
nnU-Net as ``nnUNetTrainer``, without this package installed: training-only heads (``heads.*``) and the
``semiseg`` state (teachers, memories, discriminators) are dropped, ``trainer_name`` becomes ``nnUNetTrainer``,
and the weights are checked to load strictly into the stock network built from the plans.

Name the output ``<nnUNet_results>/DatasetXXX_Name/nnUNetTrainer__<plans>__<configuration>`` to use
``nnUNetv2_predict -tr nnUNetTrainer``, or pass any folder to ``nnUNetv2_predict_from_modelfolder -m``.
"""
import argparse
import json
import os
import re
import shutil
import sys
from typing import List, Optional, Sequence

import torch

TRAINING_ONLY_PREFIXES = ('heads.',)


class ExportError(RuntimeError):
    pass


def plain_checkpoint(checkpoint: dict) -> dict:
    """The parts of one of our checkpoints that stock nnU-Net's predictor reads, as ``nnUNetTrainer``."""
    weights = {k: v for k, v in checkpoint['network_weights'].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    return {
        'network_weights': weights,
        'trainer_name': 'nnUNetTrainer',
        'init_args': checkpoint['init_args'],
        'inference_allowed_mirroring_axes': checkpoint.get('inference_allowed_mirroring_axes'),
        'current_epoch': checkpoint.get('current_epoch'),
        '_best_ema': checkpoint.get('_best_ema'),
        'exported_from_trainer': checkpoint.get('trainer_name'),
    }


def check_loads_into_stock_network(weights: dict, model_folder: str, configuration: str) -> None:
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    dataset_json = load_json(os.path.join(model_folder, 'dataset.json'))
    plans_manager = PlansManager(os.path.join(model_folder, 'plans.json'))
    cm = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, cm, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(plans_manager, cm, num_inputs, num_outputs,
                                                       enable_deep_supervision=False)
    try:
        network.load_state_dict(weights)
    except RuntimeError as e:
        raise ExportError(f'The exported weights do not load into the stock nnU-Net network of {model_folder}: {e}')


def find_folds(model_folder: str, checkpoint_name: str) -> List[str]:
    return sorted(d for d in os.listdir(model_folder)
                  if re.fullmatch(r'fold_(\d+|all)', d) and os.path.isfile(os.path.join(model_folder, d, checkpoint_name)))


def is_model_folder(folder: str) -> bool:
    """An exported model (``semiseg_export.json``) or an nnU-Net model folder (plans, dataset.json, fold_X)."""
    if not os.path.isdir(folder):
        return False
    if os.path.isfile(os.path.join(folder, 'semiseg_export.json')):
        return True
    has_json = all(os.path.isfile(os.path.join(folder, f)) for f in ('plans.json', 'dataset.json'))
    return has_json and any(re.fullmatch(r'fold_(\d+|all)', d) for d in os.listdir(folder))


def check_output_folder(model_folder: str, output_folder: str, overwrite: bool) -> None:
    """The output must not be, contain or lie inside the model; ``--overwrite`` replaces only a model folder."""
    from nnunetv2_semiseg.utilities.safe_io import UnsafeOutputError, check_output_location
    try:
        check_output_location(output_folder, [model_folder], what='output (-o)')
    except UnsafeOutputError as e:
        raise ExportError(str(e)) from None
    if not os.path.lexists(output_folder):
        return
    if not overwrite:
        raise ExportError(f'{output_folder} exists. Choose another -o or pass --overwrite.')
    if not is_model_folder(output_folder) or os.path.islink(output_folder):
        raise ExportError(f'{output_folder} exists and is not a model folder (no semiseg_export.json, or no '
                          f'plans.json + dataset.json + fold_X): --overwrite only replaces an exported or nnU-Net '
                          f'model folder. Choose another -o, or remove that folder yourself if it is obsolete.')


def load_checkpoint_file(path: str) -> dict:
    from nnunetv2_semiseg.utilities.safe_io import CheckpointReadError, load_torch_checkpoint
    try:
        return load_torch_checkpoint(path, 'cpu', 'Export another checkpoint of the fold with -chk (e.g. '
                                                  'checkpoint_best.pth), or train the fold again.')
    except CheckpointReadError as e:
        raise ExportError(str(e)) from None


TEMP_PREFIX, OLD_PREFIX = '.tmp_export_', '.old_export_'


def export_plain(model_folder: str, output_folder: str, folds: Optional[Sequence[str]] = None,
                 checkpoint_name: str = 'checkpoint_final.pth', overwrite: bool = False,
                 stream: Optional[str] = None) -> str:
    from nnunetv2_semiseg.utilities import safe_io
    for required in ('dataset.json', 'plans.json'):
        if not os.path.isfile(os.path.join(model_folder, required)):
            raise ExportError(f'{os.path.join(model_folder, required)} not found: -i must be a trained model folder '
                              f'(nnUNet_results/DatasetXXX/<Trainer>__<plans>__<configuration>).')
    fold_dirs = [f'fold_{f}' for f in folds] if folds else find_folds(model_folder, checkpoint_name)
    if not fold_dirs:
        raise ExportError(f'No fold_X/{checkpoint_name} in {model_folder}. Finish training first, or pick another '
                          f'checkpoint with -chk.')
    check_output_folder(model_folder, output_folder, overwrite)
    parent = os.path.dirname(os.path.abspath(output_folder))
    try:
        os.makedirs(parent, exist_ok=True)
        safe_io.remove_stale_temp_dirs(parent, (TEMP_PREFIX, OLD_PREFIX))
        tmp = safe_io.make_temp_dir(parent, TEMP_PREFIX)
    except OSError as e:
        _raise_if_write_failure(e, output_folder)
        raise
    try:
        for name in ('dataset.json', 'plans.json', 'dataset_fingerprint.json'):
            if os.path.isfile(os.path.join(model_folder, name)):
                shutil.copy(os.path.join(model_folder, name), os.path.join(tmp, name))
        for fold_dir in fold_dirs:
            source = os.path.join(model_folder, fold_dir, checkpoint_name)
            if not os.path.isfile(source):
                raise ExportError(f'{source} not found.')
            checkpoint = load_checkpoint_file(source)
            plain = plain_checkpoint(checkpoint)
            # nnUNetTrainerDualStream: one stream (default A) under stock keys; for B the copied plans.json is
            # rewritten to its ResidualEncoderUNet, so the check below runs against the copies in tmp.
            from nnunetv2_semiseg.networks.dualstream import select_stream_for_export
            try:
                exported_stream = select_stream_for_export(plain, tmp, stream)
            except ValueError as e:
                raise ExportError(str(e)) from None
            if exported_stream is not None:
                print(f'{fold_dir}: exporting stream {exported_stream} of {plain["exported_from_trainer"]} '
                      f'(--stream A|B chooses; the trained model itself predicts the ensemble of both)')
            check_loads_into_stock_network(plain['network_weights'], tmp, plain['init_args']['configuration'])
            os.makedirs(os.path.join(tmp, fold_dir))
            # Stock predict_from_raw_data loads 'checkpoint_final.pth' unless told otherwise with -chk.
            torch.save(plain, os.path.join(tmp, fold_dir, checkpoint_name))
        with open(os.path.join(tmp, 'semiseg_export.json'), 'w') as f:
            json.dump({'exported_from': os.path.abspath(model_folder), 'folds': fold_dirs,
                       'checkpoint': checkpoint_name, 'dropped_prefixes': list(TRAINING_ONLY_PREFIXES),
                       'stream': exported_stream}, f, indent=2)
        safe_io.finish_temp_dir(tmp)
        old = None
        if os.path.exists(output_folder):
            # Moved aside (not deleted) until the new folder is in place; a killed run leaves it for the next one.
            old = os.path.join(parent, safe_io.owned_name(OLD_PREFIX))
            os.replace(output_folder, old)
        try:
            os.replace(tmp, output_folder)
        except BaseException:
            if old is not None:
                os.replace(old, output_folder)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and not isinstance(e, ExportError):
            _raise_if_write_failure(e, output_folder)
        raise
    return output_folder


def _raise_if_write_failure(error: Exception, output_folder: str) -> None:
    # torch.save on a full disk says 'unexpected pos'; name the path and the cause instead of a traceback.
    from nnunetv2_semiseg.utilities.write_errors import describe_write_failure, untouched_note
    message = describe_write_failure(error, output_folder)
    if message:
        raise ExportError(message + untouched_note(output_folder)) from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog='nnUNetv2_semiseg_export_plain',
        description='Export a model trained with an nnunetv2_semiseg trainer as a plain nnU-Net model '
                    '(nnUNetTrainer) that stock nnU-Net predicts with, without this package.')
    parser.add_argument('-i', required=True, help='Trained model folder: nnUNet_results/DatasetXXX/'
                                                  '<Trainer>__<plans>__<configuration>')
    parser.add_argument('-o', required=True, help='Output model folder. Tip: nnUNet_results/DatasetXXX/'
                                                  'nnUNetTrainer__<plans>__<configuration> to use nnUNetv2_predict '
                                                  '-tr nnUNetTrainer')
    parser.add_argument('-f', nargs='+', default=None, help='Folds to export (default: all with a checkpoint)')
    parser.add_argument('-chk', default='checkpoint_final.pth', help='Checkpoint name (default checkpoint_final.pth)')
    parser.add_argument('--overwrite', action='store_true', help='Replace an existing output folder')
    parser.add_argument('--stream', choices=['A', 'B'], default=None,
                        help='nnUNetTrainerDualStream models only: which stream to export (default A, the plain '
                             'U-Net; B is the residual-encoder U-Net)')
    from nnunetv2_semiseg.utilities.cli import accept_underscore_spellings
    args = accept_underscore_spellings(parser).parse_args(argv)
    try:
        out = export_plain(args.i, args.o, args.f, args.chk, args.overwrite, args.stream)
    except ExportError as e:
        print(f'ERROR: {e}', file=sys.stderr)
        sys.exit(1)
    print(f'Exported plain nnU-Net model to {out}')


if __name__ == '__main__':
    main()
