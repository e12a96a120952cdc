"""Evaluation of broken inputs: truncated files, references whose values are no label, label names found in the
raw dataset's dataset.json."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.evaluation.evaluate import EvaluationError, evaluate_folders, main


def write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8)), str(path))


def cube(value=1):
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[2:8, 2:8, 2:8] = value
    return seg


@pytest.mark.parametrize('ending', ['.nii.gz', '.nii'])
@pytest.mark.parametrize('which', ['pred', 'ref'])
def test_truncated_file_is_an_error_naming_it(tmp_path, ending, which):
    ref, pred = tmp_path / 'ref', tmp_path / 'pred'
    ref.mkdir(), pred.mkdir()
    noisy = np.random.default_rng(0).integers(0, 2, (12, 12, 12))  # incompressible enough to cut inside the data
    write(ref / f'c1{ending}', noisy)
    write(pred / f'c1{ending}', noisy)
    broken = (ref if which == 'ref' else pred) / f'c1{ending}'
    data = broken.read_bytes()
    broken.write_bytes(data[:int(len(data) * 0.6)])
    with pytest.raises(EvaluationError, match=r'c1' + ending.replace('.', r'\.') + r'.*truncated'):
        evaluate_folders(str(ref), str(pred), labels=[1])


def test_reference_values_that_are_no_label_warn_and_fail_strict(tmp_path, capsys):
    ref, pred = tmp_path / 'ref', tmp_path / 'pred'
    ref.mkdir(), pred.mkdir()
    write(ref / 'c1.nii.gz', cube(255))
    write(pred / 'c1.nii.gz', cube(1))
    dj = tmp_path / 'dataset.json'
    dj.write_text(json.dumps({'labels': {'background': 0, 'la': 1}, 'file_ending': '.nii.gz'}))
    res = evaluate_folders(str(ref), str(pred), dataset_json=str(dj))
    assert any('reference' in w and 'c1.nii.gz' in w and '[255]' in w for w in res['warnings'])
    assert main(['-ref', str(ref), '-pred', str(pred), '-dj', str(dj), '--strict',
                 '-o', str(tmp_path / 'o.json')]) == 2
    err = capsys.readouterr().err
    assert '--strict' in err and '[255]' in err and 'reference' in err


def test_label_names_from_raw_dataset_json(tmp_path):
    raw = tmp_path / 'Dataset001_X'
    (raw / 'labelsTs').mkdir(parents=True)
    pred = tmp_path / 'pred'
    pred.mkdir()
    seg = cube(1)
    seg[9:11, 9:11, 9:11] = 2
    write(raw / 'labelsTs' / 'c1.nii.gz', seg)
    write(pred / 'c1.nii.gz', seg)
    (raw / 'dataset.json').write_text(json.dumps({'labels': {'background': 0, 'atrium': 1, 'scar': 2},
                                                  'file_ending': '.nii.gz'}))
    res = evaluate_folders(str(raw / 'labelsTs'), str(pred))
    assert res['label_names'] == {'1': 'atrium', '2': 'scar'}
    # a plain folder (no labelsTr/labelsTs with a dataset.json above) keeps the numbers
    plain = tmp_path / 'refs'
    plain.mkdir()
    write(plain / 'c1.nii.gz', seg)
    (tmp_path / 'dataset.json').write_text((raw / 'dataset.json').read_text())
    assert evaluate_folders(str(plain), str(pred))['label_names'] == {'1': '1', '2': '2'}
