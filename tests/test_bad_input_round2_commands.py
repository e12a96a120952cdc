"""Command-line bad input that needs no dataset: an unknown dataset ID."""
import os

import pytest

from nnunetv2_semiseg.data import preprocess_unlabeled


def _nnunet_dirs(tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        os.makedirs(tmp_path / name)
        monkeypatch.setenv(name, str(tmp_path / name))
    os.makedirs(tmp_path / 'nnUNet_raw' / 'Dataset005_Prostate')


@pytest.mark.parametrize('dataset', ['977', 'Dataset977_Nope', 'prostate'])
def test_preprocess_unlabeled_unknown_dataset_is_one_line(tmp_path, monkeypatch, capsys, dataset):
    _nnunet_dirs(tmp_path, monkeypatch)
    with pytest.raises(SystemExit) as info:
        preprocess_unlabeled.main(['-d', dataset, '-c', '3d_fullres'])
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err
    assert captured.err == (
        f"ERROR: Dataset '{dataset}' not found in nnUNet_raw ({tmp_path / 'nnUNet_raw'}) or nnUNet_preprocessed "
        f"({tmp_path / 'nnUNet_preprocessed'}). Pass -d with a dataset ID or a DatasetXXX_Name (present: "
        f"Dataset005_Prostate), or set nnUNet_raw / nnUNet_preprocessed to the folders that hold it.\n")
