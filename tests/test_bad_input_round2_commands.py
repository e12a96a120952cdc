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


def test_broken_link_among_unlabeled_images_is_named_with_its_target(tmp_path):
    raw = tmp_path / 'Dataset901_X'
    folder = raw / 'imagesUnlabeled'
    os.makedirs(folder)
    (folder / 'unl_000_0000.nii.gz').write_bytes(b'')
    os.symlink('../../moved/unl_001_0000.nii.gz', folder / 'unl_001_0000.nii.gz')
    with pytest.raises(preprocess_unlabeled.UnlabeledPreprocessingError) as info:
        preprocess_unlabeled.find_unlabeled_cases(str(raw), {'file_ending': '.nii.gz', 'channel_names': {'0': 'MR'}})
    assert str(info.value) == (
        f"{folder / 'unl_001_0000.nii.gz'} is a broken symbolic link: it points to ../../moved/unl_001_0000.nii.gz "
        f"({tmp_path / 'moved' / 'unl_001_0000.nii.gz'}), which does not exist. Mount or restore the target, "
        f"re-create the link, or remove it from imagesUnlabeled/.")


def test_vector_image_among_unlabeled_images_is_named_with_its_component_count(tmp_path):
    import numpy as np
    import SimpleITK as sitk
    raw = tmp_path / 'Dataset901_X'
    for sub in ('imagesTr', 'imagesUnlabeled'):
        os.makedirs(raw / sub)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(raw / 'imagesTr' / 'a_0000.nii.gz'))
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    path = raw / 'imagesUnlabeled' / 'u_0000.nii.gz'
    sitk.WriteImage(rgb, str(path))
    dataset_json = {'file_ending': '.nii.gz', 'channel_names': {'0': 'MR'}}
    cases = preprocess_unlabeled.find_unlabeled_cases(str(raw), dataset_json)
    with pytest.raises(preprocess_unlabeled.UnlabeledPreprocessingError) as info:
        preprocess_unlabeled.check_unlabeled_images(cases, str(raw), dataset_json)
    assert str(info.value).startswith(
        f"Unlabeled case 'u': {path} has 3 components per voxel (a vector/RGB image), but nnU-Net expects one scalar "
        f"image per channel and this dataset has 1 channel(s).")


def test_converters_accept_underscore_spellings_of_dashed_options(capsys):
    from dataset_conversion import acdc, brats2020, la, pancreas
    args = acdc.build_parser().parse_args(['-i', 'x', '--train_list', 't', '--only_present', '--h5_spacing', '1', '1',
                                           '2', '--dataset_id', '5', '--num_processes', '2', '--val_list', 'v'])
    assert (str(args.train_list), args.only_present, args.h5_spacing, args.dataset_id, args.num_processes,
            str(args.val_list)) == ('t', True, [1.0, 1.0, 2.0], 5, 2, 'v')
    # the dashed spellings keep working
    args = la.build_parser().parse_args(['-i', 'x', '--train-list', 't', '--only-present', '--labeled-list', 'l'])
    assert (str(args.train_list), args.only_present, str(args.labeled_list)) == ('t', True, 'l')
    args = pancreas.get_parser().parse_args(['-i', 'x', '--label_geometry', 'voxel', '--labels_folder', 'f',
                                             '--h5_channel_name', 'zscore'])
    assert (args.label_geometry, str(args.labels_folder), args.h5_channel_name) == ('voxel', 'f', 'zscore')
    assert brats2020.get_parser().parse_args(['-i', 'x', '--labeled_fraction', '0.2']).labeled_fraction == 0.2
    # one option under two spellings stays one option: the mutually exclusive group still applies
    with pytest.raises(SystemExit):
        la.build_parser().parse_args(['-i', 'x', '--labeled', '2', '--labeled_list', 'l'])
    assert 'not allowed with argument' in capsys.readouterr().err
