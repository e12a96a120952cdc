"""``nnUNetv2_semiseg_pseudolabel``: a tiny trained model pseudo-labels imagesUnlabeled/, the new raw dataset is
accepted by stock ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``, the real-only splits, and the errors."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.demo.pipeline import StepFailed
from nnunetv2_semiseg.pseudolabel import (MANIFEST_FILENAME, PseudoLabelError, make_pseudolabel_dataset,
                                          write_real_only_splits)

TRAINER = 'nnUNetTrainer_semisegSchedule'
CFG = '3d_fullres'
NEW_ID = 902
NEW_NAME = 'Dataset902_SemiSegSynthPL'
LABELED = [f'lab_{i:03d}' for i in range(6)]
UNLABELED = [f'unl_{i:03d}' for i in range(4)]
TEST = ['test_000', 'test_001']


def _read(path):
    return sitk.ReadImage(path)


def _same_geometry(a, b):
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def _no_temp_leftovers(raw_root):
    return [f for f in os.listdir(raw_root) if f.startswith(('.tmp_pseudolabel', '.old_pseudolabel'))] == []


def test_pseudolabel_dataset_passes_stock_verification(workspace, monkeypatch, capsys):
    ws = workspace
    raw_root = os.path.dirname(ws.raw)
    # A tiny model: fold 0 (4 train / 2 val), 1 epoch of 2 iterations. nnU-Net writes the source splits_final.json.
    ws.run('nnUNetv2_train', '901', CFG, '0', '-tr', TRAINER, '-p', ws.plans, '-device', 'cpu',
           env=ws.train_env(1, 2))
    source_splits = json.load(open(os.path.join(ws.preprocessed, 'splits_final.json')))

    out = ws.run('nnUNetv2_semiseg_pseudolabel', '-d', '901', '-c', CFG, '-tr', TRAINER, '-p', ws.plans, '-f', '0',
                 '-o', str(NEW_ID), '-device', 'cpu', '--disable_tta', '-npp', '0', '-nps', '0')
    new = os.path.join(raw_root, NEW_NAME)
    assert f'Wrote {new}: 6 real-labeled + 4 pseudo-labeled training cases, 2 test cases.' in out
    assert _no_temp_leftovers(raw_root)

    # Layout: labeled + pseudo-labeled in imagesTr/labelsTr, the test set copied, no imagesUnlabeled.
    assert sorted(os.listdir(new)) == ['dataset.json', 'imagesTr', 'imagesTs', 'labelsTr', 'labelsTs',
                                       MANIFEST_FILENAME]
    assert sorted(os.listdir(os.path.join(new, 'imagesTr'))) == [f'{c}_0000.nii.gz' for c in LABELED + UNLABELED]
    assert sorted(os.listdir(os.path.join(new, 'labelsTr'))) == [f'{c}.nii.gz' for c in LABELED + UNLABELED]
    assert sorted(os.listdir(os.path.join(new, 'imagesTs'))) == [f'{c}_0000.nii.gz' for c in TEST]
    assert sorted(os.listdir(os.path.join(new, 'labelsTs'))) == [f'{c}.nii.gz' for c in TEST]

    # Real labels and all images are byte-identical copies of the source files.
    for c in LABELED:
        for sub, name in (('labelsTr', f'{c}.nii.gz'), ('imagesTr', f'{c}_0000.nii.gz')):
            assert open(os.path.join(new, sub, name), 'rb').read() == open(os.path.join(ws.raw, sub, name), 'rb').read()
    for c in UNLABELED:
        assert open(os.path.join(new, 'imagesTr', f'{c}_0000.nii.gz'), 'rb').read() == \
            open(os.path.join(ws.raw, 'imagesUnlabeled', f'{c}_0000.nii.gz'), 'rb').read()

    # Pseudo labels: label values of the dataset, the image's geometry, and a non-trivial segmentation.
    dataset_json = json.load(open(os.path.join(new, 'dataset.json')))
    allowed = set(dataset_json['labels'].values())
    for c in UNLABELED:
        label = _read(os.path.join(new, 'labelsTr', f'{c}.nii.gz'))
        image = _read(os.path.join(new, 'imagesTr', f'{c}_0000.nii.gz'))
        assert _same_geometry(label, image), c
        values = np.unique(sitk.GetArrayFromImage(label))
        assert set(values.tolist()) <= allowed and 0 in values, (c, values)
        assert label.GetSize() == (32, 32, 20)

    # dataset.json: the source's with numTraining updated.
    source_json = json.load(open(os.path.join(ws.raw, 'dataset.json')))
    assert dataset_json['numTraining'] == 10 and source_json['numTraining'] == 6
    assert {k: v for k, v in dataset_json.items() if k not in ('numTraining', 'name')} == \
        {k: v for k, v in source_json.items() if k not in ('numTraining', 'name')}

    manifest = json.load(open(os.path.join(new, MANIFEST_FILENAME)))
    assert manifest['real_labeled_cases'] == LABELED and manifest['pseudo_labeled_cases'] == UNLABELED
    assert manifest['test_cases'] == TEST
    assert manifest['source_dataset'] == ws.dataset_name and manifest['trainer'] == TRAINER
    assert manifest['trainer_in_checkpoint'] == TRAINER
    assert manifest['model_folder'] == os.path.abspath(ws.model_folder(TRAINER))
    assert manifest['plans'] == ws.plans and manifest['configuration'] == CFG
    assert manifest['folds'] == [0] and manifest['checkpoint'] == 'checkpoint_final.pth' and manifest['tta'] is False
    assert manifest['created'].startswith('20')

    # Stock planning + preprocessing with integrity verification accepts it (planning env: no nnUNet_n_proc_DA).
    ws.run('nnUNetv2_plan_and_preprocess', '-d', str(NEW_ID), '-c', CFG, '-np', '1', '-npfp', '1',
           '--verify_dataset_integrity', env=ws.env)
    preprocessed = os.path.join(os.path.dirname(ws.preprocessed), NEW_NAME)
    cases = sorted(f[:-5] for f in os.listdir(os.path.join(preprocessed, f'nnUNetPlans_{CFG}'))
                   if f.endswith('.b2nd') and not f.endswith('_seg.b2nd'))
    assert cases == LABELED + UNLABELED

    # Real-only splits: the source dataset's folds for validation, pseudo-labeled cases in every training set.
    out = ws.run('nnUNetv2_semiseg_pseudolabel', '-o', str(NEW_ID), '--splits_real_only', env=ws.env)
    splits = json.load(open(os.path.join(preprocessed, 'splits_final.json')))
    assert len(splits) == len(source_splits) == 5
    for new_fold, source_fold in zip(splits, source_splits):
        assert new_fold['val'] == sorted(source_fold['val'])
        assert new_fold['train'] == sorted(source_fold['train']) + UNLABELED
    assert 'from the folds of' in out

    # --overwrite replaces a dataset this command wrote and names the stale preprocessed data. This time the model
    # is given as a folder (-m, as for a further self-training round); trainer/plans/configuration come from its name.
    ws.set_process_env(monkeypatch)
    with pytest.raises(PseudoLabelError, match='already exists'):
        _api(ws)
    capsys.readouterr()
    assert _api(ws, overwrite=True, verbose=True, model_folder=ws.model_folder(TRAINER), configuration=None,
                trainer=None, plans=None) == new
    assert f'Note: {preprocessed} was made from the replaced dataset' in capsys.readouterr().out
    again = json.load(open(os.path.join(new, MANIFEST_FILENAME)))
    assert again['pseudo_labeled_cases'] == UNLABELED and again['created'] >= manifest['created']
    assert (again['trainer'], again['plans'], again['configuration']) == (TRAINER, ws.plans, CFG)
    assert again['model_folder'] == manifest['model_folder']
    assert sorted(os.listdir(os.path.join(new, 'labelsTr'))) == [f'{c}.nii.gz' for c in LABELED + UNLABELED]
    assert _no_temp_leftovers(raw_root)


def test_real_only_splits_without_source_split_and_refusal(workspace, monkeypatch, tmp_path):
    """No source splits_final.json: nnU-Net's 5-fold split of the real cases. An existing, different file is kept."""
    ws = workspace
    ws.set_process_env(monkeypatch)
    raw_root, pre_root = os.path.dirname(ws.raw), os.path.dirname(ws.preprocessed)
    with pytest.raises(PseudoLabelError, match='No pseudo-labeled raw dataset 902'):
        write_real_only_splits(NEW_ID, verbose=False)
    # A pseudo-labeled raw dataset needs only its manifest here; the splits go into its preprocessed folder.
    os.makedirs(os.path.join(raw_root, NEW_NAME))
    json.dump({'source_dataset': ws.dataset_name, 'real_labeled_cases': LABELED, 'pseudo_labeled_cases': UNLABELED},
              open(os.path.join(raw_root, NEW_NAME, MANIFEST_FILENAME), 'w'))
    with pytest.raises(PseudoLabelError, match='Run nnUNetv2_plan_and_preprocess -d 902 first'):
        write_real_only_splits(NEW_ID, verbose=False)
    os.makedirs(os.path.join(pre_root, NEW_NAME))
    assert not os.path.isfile(os.path.join(ws.preprocessed, 'splits_final.json'))
    path = write_real_only_splits(NEW_ID, verbose=False)
    splits = json.load(open(path))
    assert len(splits) == 5
    assert sorted(c for s in splits for c in s['val']) == LABELED       # every real case validated exactly once
    for s in splits:
        assert set(s['train']) == (set(LABELED) - set(s['val'])) | set(UNLABELED)
    # Same splits again: accepted. A different existing file: refused without --overwrite, replaced with it.
    assert write_real_only_splits(NEW_ID, verbose=False) == path
    json.dump([{'train': LABELED[:5] + UNLABELED, 'val': LABELED[5:] + UNLABELED[:1]}], open(path, 'w'))
    with pytest.raises(PseudoLabelError, match='exists with different folds.*--overwrite'):
        write_real_only_splits(NEW_ID, verbose=False)
    assert len(json.load(open(path))) == 1
    write_real_only_splits(NEW_ID, overwrite=True, verbose=False)
    assert json.load(open(path)) == splits


def _api(ws, **kwargs):
    args = dict(dataset_name_or_id=ws.dataset_id, configuration=CFG, trainer=TRAINER, fold=0,
                new_dataset_id=NEW_ID, plans=ws.plans, device='cpu', num_processes_preprocessing=0,
                num_processes_segmentation_export=0, disable_tta=True, verbose=False)
    args.update(kwargs)
    return make_pseudolabel_dataset(**args)


def test_errors(workspace, monkeypatch):
    ws = workspace
    ws.set_process_env(monkeypatch)
    raw_root = os.path.dirname(ws.raw)
    before = sorted(os.listdir(raw_root))

    with pytest.raises(PseudoLabelError, match='equals the source dataset ID'):
        _api(ws, new_dataset_id=ws.dataset_id)
    with pytest.raises(PseudoLabelError, match='integers 1..999'):
        _api(ws, new_dataset_id=1000)

    # Missing model folder: names the folder and the training command that makes it.
    with pytest.raises(PseudoLabelError) as e:
        _api(ws)
    message = str(e.value)
    assert ws.model_folder(TRAINER) in message and 'not found' in message
    assert f'nnUNetv2_train 901 {CFG} 0 -tr {TRAINER} -p {ws.plans}' in message

    # Model folder present but the fold's checkpoint missing: names the checkpoint, the command and -chk options.
    fold_dir = os.path.join(ws.model_folder(TRAINER), 'fold_0')
    os.makedirs(fold_dir)
    for name in ('dataset.json', 'plans.json'):
        src = os.path.join(ws.preprocessed, 'dataset.json' if name == 'dataset.json' else ws.plans + '.json')
        open(os.path.join(ws.model_folder(TRAINER), name), 'w').write(open(src).read())
    open(os.path.join(fold_dir, 'checkpoint_best.pth'), 'w').close()
    with pytest.raises(PseudoLabelError) as e:
        _api(ws)
    message = str(e.value)
    assert os.path.join(fold_dir, 'checkpoint_final.pth') in message
    assert f'nnUNetv2_train 901 {CFG} 0 -tr {TRAINER} -p {ws.plans}' in message and '--c' in message
    assert '-chk: checkpoint_best.pth' in message
    open(os.path.join(fold_dir, 'checkpoint_final.pth'), 'w').close()   # (never loaded: the next checks come first)

    # -m: a folder that is not named like an nnU-Net model, or does not exist.
    with pytest.raises(PseudoLabelError, match='not an nnU-Net model folder name.*<Trainer>__<Plans>__<configuration>'):
        _api(ws, model_folder=os.path.join(ws.base, 'somewhere'))
    missing = os.path.join(ws.base, 'nnUNet_results', 'Dataset777_X', f'{TRAINER}__{ws.plans}__2d')
    with pytest.raises(PseudoLabelError,
                       match=f'-m.* not found. Train it first: nnUNetv2_train 777 2d 0 -tr {TRAINER}'):
        _api(ws, model_folder=missing)

    # No imagesUnlabeled/.
    os.rename(os.path.join(ws.raw, 'imagesUnlabeled'), os.path.join(ws.raw, 'moved_away'))
    with pytest.raises(PseudoLabelError, match='imagesUnlabeled does not exist: there is nothing to pseudo-label'):
        _api(ws)
    os.rename(os.path.join(ws.raw, 'moved_away'), os.path.join(ws.raw, 'imagesUnlabeled'))

    # An unlabeled case ID equal to a labeled one would replace a real label.
    clash = os.path.join(ws.raw, 'imagesUnlabeled', 'lab_000_0000.nii.gz')
    open(clash, 'wb').write(open(os.path.join(ws.raw, 'imagesTr', 'lab_000_0000.nii.gz'), 'rb').read())
    with pytest.raises(PseudoLabelError, match=r"\['lab_000'\].*equal labeled case IDs.*Rename"):
        _api(ws)
    os.remove(clash)

    # Bad name, fold.
    with pytest.raises(PseudoLabelError, match='not usable as a dataset name'):
        _api(ws, new_name='a b')
    with pytest.raises(PseudoLabelError, match="Fold 'x'"):
        _api(ws, fold='x')
    assert sorted(os.listdir(raw_root)) == before       # nothing written by any failed call

    # Existing target: refused without --overwrite; a dataset not written by this command is never replaced;
    # another name with the same ID is refused even with --overwrite.
    target = os.path.join(raw_root, NEW_NAME)
    os.makedirs(target)
    open(os.path.join(target, 'keep.txt'), 'w').write('precious')
    with pytest.raises(PseudoLabelError, match='already exists.*--overwrite'):
        _api(ws)
    with pytest.raises(PseudoLabelError, match='not written by nnUNetv2_semiseg_pseudolabel'):
        _api(ws, overwrite=True)
    with pytest.raises(PseudoLabelError, match='Dataset ID 902 is taken.*Dataset902_SemiSegSynthPL'):
        _api(ws, new_name='Other', overwrite=True)
    assert open(os.path.join(target, 'keep.txt')).read() == 'precious'

    # The CLI reports the same errors as one line on stderr with exit code 1.
    with pytest.raises(StepFailed, match='error: .*already exists'):
        ws.run('nnUNetv2_semiseg_pseudolabel', '-d', '901', '-c', CFG, '-tr', TRAINER, '-p', ws.plans, '-f', '0',
               '-o', str(NEW_ID), '-device', 'cpu')
    assert _no_temp_leftovers(raw_root)
