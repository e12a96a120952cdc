"""Drive the stock command-line entry points for several trainers in ONE Python process (a helper of
tests/test_region_every_trainer.py and tests/test_ignore_label_every_trainer.py, not a test module).

Each step calls the function its console script calls (``nnUNetv2_train`` -> ``run_training_entry``, ...) with the
command line in ``sys.argv``, exactly as the installed script does, so argument parsing, the trainer search through
``nnUNet_extTrainer`` and strict checkpoint loading all run for real; only the interpreter start (about 20 s per
command on a loaded 2-core machine) is shared.

    python tests/region_cli_chain.py <report.json> <dataset id> <plans> <configuration> <images folder> <out> \
        [--no-resume] T1 T2 ...

Per trainer: train 1 epoch, resume with --c to 2 epochs (not with --no-resume), predict with the trainer (saving probabilities), export
to a plain nnU-Net model, predict with the exported model by stock nnU-Net's predictor (model-folder API). A failing
trainer is recorded (step and traceback) and the next one runs.
"""
import json
import os
import sys
import time
import traceback


def call(entry, argv):
    sys.argv = list(argv)
    try:
        entry()
    except SystemExit as e:
        if e.code not in (None, 0):
            raise RuntimeError(f'{argv[0]} exited with {e.code}')


def predict_model_folder(model_folder, images, output):
    """What ``nnUNetv2_predict_from_modelfolder -m <folder> -f all --disable_tta`` does, with nnU-Net's sequential
    prediction (that entry point has no single-process mode: it starts a worker pool even for -nps 0)."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device('cpu'),
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(model_folder, ('all',), 'checkpoint_final.pth')
    os.makedirs(output, exist_ok=True)
    predictor.predict_from_files_sequential(images, output, save_probabilities=False, overwrite=True)


def chain(trainer, dataset_id, plans, configuration, images, out, resume=True):
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    from nnunetv2.run.run_training import run_training_entry
    from nnunetv2_semiseg.export_plain import main as export_main
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    base = os.path.join(out, trainer)
    model = get_output_folder(int(dataset_id), trainer, plans, configuration)
    predict_common = ['-device', 'cpu', '-npp', '0', '-nps', '0', '--disable_tta']
    steps = [
        ('train', {'nnUNet_semiseg_num_epochs': '1'}, run_training_entry,
         ['nnUNetv2_train', dataset_id, configuration, 'all', '-tr', trainer, '-p', plans, '-device', 'cpu']),
        ('resume', {'nnUNet_semiseg_num_epochs': '2'}, run_training_entry,
         ['nnUNetv2_train', dataset_id, configuration, 'all', '-tr', trainer, '-p', plans, '-device', 'cpu', '--c']),
        ('predict', {}, predict_entry_point,
         ['nnUNetv2_predict', '-i', images, '-o', os.path.join(base, 'pred'), '-d', dataset_id, '-c', configuration,
          '-f', 'all', '-tr', trainer, '-p', plans, '--save_probabilities', *predict_common]),
        ('export', {}, lambda: export_main(sys.argv[1:]),
         ['nnUNetv2_semiseg_export_plain', '-i', model, '-o', os.path.join(base, 'plain')]),
        ('predict_exported', {}, lambda: predict_model_folder(os.path.join(base, 'plain'), images,
                                                               os.path.join(base, 'pred_plain')), ['predict_exported']),
    ]
    if not resume:
        steps = [step for step in steps if step[0] != 'resume']
    record = {'model': model, 'base': base, 'seconds': {}}
    for name, env, entry, argv in steps:
        os.environ.update(env)
        started = time.time()
        try:
            call(entry, argv)
        except BaseException:
            record.update(ok=False, failed_step=name, error=traceback.format_exc()[-6000:])
            return record
        record['seconds'][name] = round(time.time() - started, 1)
    record['ok'] = True
    return record


def main():
    report_file, dataset_id, plans, configuration, images, out, *trainers = sys.argv[1:]
    resume = '--no-resume' not in trainers
    trainers = [t for t in trainers if t != '--no-resume']
    report = {}
    for trainer in trainers:
        report[trainer] = chain(trainer, dataset_id, plans, configuration, images, out, resume)
        with open(report_file, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    main()
