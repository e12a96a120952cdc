"""Pancreas-CT converter on synthetic fixtures: a TCIA-style DICOM tree with NIH-style label NIfTIs, and h5 files
in the CoraNet, MC-Net+ and MCF spellings. Volumes are tiny (16 x 12 x 6) so the whole file runs in seconds."""
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import pancreas
from dataset_conversion.common import ConversionError

SIZE_XYZ = (16, 12, 6)
SPACING = (0.7, 0.7, 2.5)
ORIGIN = (-10.0, -20.0, -30.0)


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
def hu_volume(case_no: int) -> np.ndarray:
    """(z, y, x) int16 HU volume, different per case so mix-ups are detected: air-like values (< -700) everywhere
    except soft tissue (40..100 HU) under the case's pancreas mask, as the alignment check expects."""
    x, y, z = SIZE_XYZ
    ramp = np.arange(x * y * z).reshape(z, y, x)
    hu = -1000 + ramp % 300 + case_no
    hu[pancreas_mask(case_no) > 0] = 40 + ramp[pancreas_mask(case_no) > 0] % 50 + case_no
    return hu.astype(np.int16)


def pancreas_mask(case_no: int) -> np.ndarray:
    """(z, y, x) label, asymmetric in every axis so flips/transpositions are detected."""
    m = np.zeros(SIZE_XYZ[::-1], np.uint8)
    m[1:3, 2:5, 3:9 + case_no % 3] = 1
    m[4, 8, 12] = 1
    return m


def write_dicom_series(folder: Path, hu_zyx: np.ndarray, case_no: int) -> None:
    """One CT series with the tags GDCM's series lookup and the series reader need (UIDs, position, orientation)."""
    folder.mkdir(parents=True)
    vol = sitk.GetImageFromArray(hu_zyx)
    vol.SetSpacing(SPACING)
    vol.SetOrigin(ORIGIN)
    study = f'1.2.826.0.1.3680043.2.1125.{case_no}.1'
    series = f'1.2.826.0.1.3680043.2.1125.{case_no}.2'
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    # written in reverse order with shuffled file names: the reader must sort by position, not by name
    for z in reversed(range(vol.GetDepth())):
        s = vol[:, :, z]
        tags = {'0008|0060': 'CT', '0008|0016': '1.2.840.10008.5.1.4.1.1.2', '0008|0018': f'{series}.{z + 1}',
                '0020|000d': study, '0020|000e': series, '0020|0013': str(z + 1), '0018|0050': str(SPACING[2]),
                '0020|0032': '\\'.join(str(c) for c in vol.TransformIndexToPhysicalPoint((0, 0, z))),
                '0020|0037': '1\\0\\0\\0\\1\\0'}
        for k, v in tags.items():
            s.SetMetaData(k, v)
        writer.SetFileName(str(folder / f'1-{(z * 5) % 7 + 10 * z:03d}.dcm'))
        writer.Execute(s)


def write_label(path: Path, mask_zyx: np.ndarray, flip_z_header: bool = False) -> None:
    """Label NIfTI on the image grid; flip_z_header stores the same physical label with the z axis reversed
    (direction z = -1, origin at the top slice), the kind of header difference the NIH labels can have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if flip_z_header:
        img = sitk.GetImageFromArray(mask_zyx[::-1].copy())
        img.SetSpacing(SPACING)
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
        img.SetOrigin((ORIGIN[0], ORIGIN[1], ORIGIN[2] + (SIZE_XYZ[2] - 1) * SPACING[2]))
    else:
        img = sitk.GetImageFromArray(mask_zyx)
        img.SetSpacing(SPACING)
        img.SetOrigin(ORIGIN)
    sitk.WriteImage(img, str(path))


@pytest.fixture
def dicom_release(tmp_path):
    """TCIA tree with 4 cases (0001, 0002, 0013, 0064) and NIH labels for all but the unlabeled 0013."""
    root = tmp_path / 'manifest-1599750808610' / 'Pancreas-CT'  # NBIA nesting; tests pass -i at either level
    labels = root / 'TCIA_pancreas_labels-02-05-2017'
    for no in (1, 2, 13, 64):
        write_dicom_series(root / f'PANCREAS_{no:04d}' / f'11-24-2015-PANCREAS{no:04d}-{no}' / f'Pancreas-{no}',
                           hu_volume(no), no)
        if no != 13:
            write_label(labels / f'label{no:04d}.nii.gz', pancreas_mask(no), flip_z_header=(no == 2))
    return root


def write_h5(path: Path, case_no: int, image_key='image', label_key='label', label_shape=None,
             label_dtype=np.uint8) -> tuple:
    """h5 in the releases' (x, y, z) order; returns (image_xyz, label_xyz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (np.random.default_rng(case_no).random((16, 12, 8)) + case_no).astype(np.float32)
    label = np.zeros(label_shape or image.shape, label_dtype)
    label[2:6, 3:5, 1:4] = 1
    label[15, 0, -1] = 1
    with h5py.File(path, 'w') as f:
        f.create_dataset(image_key, data=image, compression='gzip')
        f.create_dataset(label_key, data=label, compression='gzip')
    return image, label


def run(argv):
    return pancreas.convert(pancreas.get_parser().parse_args([str(a) for a in argv]))


def load(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def all_files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def write_list(path: Path, ids) -> Path:
    path.write_text(''.join(f'{i}\n' for i in ids))
    return path


# ----------------------------------------------------------------------------------------------------------------
# ID spellings
# ----------------------------------------------------------------------------------------------------------------
def test_all_literature_spellings_map_to_the_tcia_id():
    for name in ('0007.h5', 'data0007', 'image0007', 'image0007_norm.h5', 'PANCREAS_0007', 'PANCREAS_0007.h5',
                 'label0007.nii.gz', 'some/dir/0007.h5'):
        assert pancreas.canonical_case_id(name) == 'PANCREAS_0007', name
    for name in ('0083.h5', 'image0000', 'case_0007', 'PANCREAS_7', 'foo.h5'):
        assert pancreas.canonical_case_id(name) is None, name


def test_packaged_splits_have_published_sizes():
    sizes = {}
    for split in ('coranet', 'mcnet', 'mcf_fold0', 'mcf_fold2'):
        args = pancreas.get_parser().parse_args(['-i', 'x', '--split', split])
        train, test, _, _ = pancreas._split_lists(args)
        assert not set(train) & set(test)
        sizes[split] = (len(train), len(test), train[0])
    assert sizes == {'coranet': (62, 18, 'PANCREAS_0001'), 'mcnet': (62, 20, 'PANCREAS_0057'),
                     'mcf_fold0': (62, 20, 'PANCREAS_0001'), 'mcf_fold2': (61, 21, 'PANCREAS_0001')}


def test_duplicate_scan_across_train_test_is_warned():
    w = pancreas.duplicate_scan_warnings(['PANCREAS_0070', 'PANCREAS_0005'], ['PANCREAS_0002'])
    assert len(w) == 1 and 'PANCREAS_0070' in w[0] and 'PANCREAS_0002' in w[0]
    assert pancreas.duplicate_scan_warnings(['PANCREAS_0070', 'PANCREAS_0002'], ['PANCREAS_0003']) == []


# ----------------------------------------------------------------------------------------------------------------
# DICOM form
# ----------------------------------------------------------------------------------------------------------------
def test_dicom_conversion_layout_values_and_geometry(dicom_release, tmp_path):
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001', 'PANCREAS_0002', 'PANCREAS_0013'])
    test = write_list(tmp_path / 'test.txt', ['0064'])
    out = run(['-i', dicom_release, '--output', tmp_path / 'raw', '-d', 104, '--labeled', 2,
               '--train-list', train, '--test-list', test])
    assert out == tmp_path / 'raw' / 'Dataset104_PancreasCT'
    assert all_files(out) == [
        'dataset.json', 'imagesTr/PANCREAS_0001_0000.nii.gz', 'imagesTr/PANCREAS_0002_0000.nii.gz',
        'imagesTs/PANCREAS_0064_0000.nii.gz', 'imagesUnlabeled/PANCREAS_0013_0000.nii.gz',
        'labelsTr/PANCREAS_0001.nii.gz', 'labelsTr/PANCREAS_0002.nii.gz', 'labelsTs/PANCREAS_0064.nii.gz',
        'semiseg_split.json']
    for no, sub in ((1, 'imagesTr'), (13, 'imagesUnlabeled'), (64, 'imagesTs')):
        img = sitk.ReadImage(str(out / sub / f'PANCREAS_{no:04d}_0000.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), hu_volume(no))  # HU, slice order restored
        assert img.GetSize() == SIZE_XYZ
        np.testing.assert_allclose(img.GetSpacing(), SPACING, rtol=1e-5)
        np.testing.assert_allclose(img.GetOrigin(), ORIGIN, atol=1e-4)
    # case 2's label header had a flipped z axis: it must come back voxel-aligned with the image
    for no, sub in ((1, 'labelsTr'), (2, 'labelsTr'), (64, 'labelsTs')):
        lab = sitk.ReadImage(str(out / sub / f'PANCREAS_{no:04d}.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), pancreas_mask(no))
        np.testing.assert_allclose(lab.GetOrigin(), ORIGIN, atol=1e-4)
    ds = json.loads((out / 'dataset.json').read_text())
    assert ds['channel_names'] == {'0': 'CT'} and ds['labels'] == {'background': 0, 'pancreas': 1}
    assert ds['numTraining'] == 2 and ds['file_ending'] == '.nii.gz'
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    assert manifest['labeled'] == ['PANCREAS_0001', 'PANCREAS_0002']
    assert manifest['unlabeled'] == ['PANCREAS_0013'] and manifest['test'] == ['PANCREAS_0064']
    assert manifest['train_list'] == str(train) and manifest['source_format'] == 'dicom'
    assert 'reoriented' in manifest['geometry_fixes']['PANCREAS_0002']
    assert manifest['warnings'] == []  # every label sits on soft tissue


def test_dicom_misaligned_label_is_reported(dicom_release, tmp_path, capsys):
    """A label whose voxels are z-flipped against the image (header claims no flip) is converted but reported."""
    label = dicom_release / 'TCIA_pancreas_labels-02-05-2017' / 'label0001.nii.gz'
    write_label(label, pancreas_mask(1)[::-1].copy())
    out = run(['-i', dicom_release, '--output', tmp_path / 'raw', '--train-list',
               write_list(tmp_path / 'train.txt', ['PANCREAS_0001', 'PANCREAS_0002']), '--test-list',
               write_list(tmp_path / 'test.txt', [])])
    warnings = json.loads((out / 'semiseg_split.json').read_text())['warnings']
    assert len(warnings) == 1
    assert warnings[0].startswith('case PANCREAS_0001: only 0 % of the labeled voxels have soft-tissue HU')
    assert 'WARNING: case PANCREAS_0001' in capsys.readouterr().out


def test_dicom_unlabeled_case_label_is_never_written(dicom_release, tmp_path):
    """Case 0002 has a label but is unlabeled here: its label must not appear anywhere in the output."""
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001', 'PANCREAS_0002'])
    test = write_list(tmp_path / 'test.txt', [])
    out = run(['-i', dicom_release, '--output', tmp_path / 'raw', '--labeled', 1, '--train-list', train,
               '--test-list', test])
    assert not any('PANCREAS_0002' in f for f in all_files(out / 'labelsTr') + all_files(out / 'labelsTs'))
    assert (out / 'imagesUnlabeled' / 'PANCREAS_0002_0000.nii.gz').is_file()
    assert [p.name for p in (out / 'imagesTr').iterdir()] == ['PANCREAS_0001_0000.nii.gz']
    # the unlabeled image contains no label-like content either (it is the CT volume)
    np.testing.assert_array_equal(load(out / 'imagesUnlabeled' / 'PANCREAS_0002_0000.nii.gz'), hu_volume(2))


def test_dicom_voxel_mode_copies_image_geometry(dicom_release, tmp_path):
    # a label whose header is nonsense (other origin) but whose voxels line up with the DICOM array
    lab_dir = tmp_path / 'labels'
    img = sitk.GetImageFromArray(pancreas_mask(1))
    img.SetSpacing(SPACING)
    img.SetOrigin((500.0, 500.0, 500.0))
    lab_dir.mkdir()
    sitk.WriteImage(img, str(lab_dir / 'label0001.nii.gz'))
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001'])
    test = write_list(tmp_path / 'test.txt', [])
    argv = ['-i', dicom_release, '--output', tmp_path / 'raw', '--labels-folder', lab_dir, '--train-list', train,
            '--test-list', test]
    with pytest.raises(ConversionError, match=r'PANCREAS_0001.*origin.*--label-geometry voxel'):
        run(argv)
    out = run(argv + ['--label-geometry', 'voxel'])
    lab = sitk.ReadImage(str(out / 'labelsTr' / 'PANCREAS_0001.nii.gz'))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), pancreas_mask(1))
    np.testing.assert_allclose(lab.GetOrigin(), ORIGIN, atol=1e-4)


def test_dicom_label_shape_mismatch(dicom_release, tmp_path):
    label = dicom_release / 'TCIA_pancreas_labels-02-05-2017' / 'label0001.nii.gz'
    write_label(label, pancreas_mask(1)[:-1])  # one slice short
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001'])
    with pytest.raises(ConversionError, match=r'case PANCREAS_0001: label .*label0001\.nii\.gz.*size'):
        run(['-i', dicom_release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list',
             write_list(tmp_path / 'test.txt', [])])
    assert not (tmp_path / 'raw').exists() or list((tmp_path / 'raw').iterdir()) == []


def test_dicom_label_spacing_mismatch(dicom_release, tmp_path):
    label = dicom_release / 'TCIA_pancreas_labels-02-05-2017' / 'label0001.nii.gz'
    img = sitk.GetImageFromArray(pancreas_mask(1))
    img.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(img, str(label))
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001'])
    for mode in ('physical', 'voxel'):
        with pytest.raises(ConversionError, match=r'PANCREAS_0001.*label0001\.nii\.gz.*spacing'):
            run(['-i', dicom_release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list',
                 write_list(tmp_path / 'test.txt', []), '--label-geometry', mode])


def test_dicom_labeled_case_without_label(dicom_release, tmp_path):
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0013', 'PANCREAS_0001'])
    with pytest.raises(ConversionError, match=r'case PANCREAS_0013 has no label: expected label0013\.nii\.gz'):
        run(['-i', dicom_release, '--output', tmp_path / 'raw', '--labeled', 1, '--train-list', train,
             '--test-list', write_list(tmp_path / 'test.txt', [])])


def test_dicom_two_series_in_one_case_is_an_error(dicom_release, tmp_path):
    write_dicom_series(dicom_release / 'PANCREAS_0001' / 'other-study' / 'localizer', hu_volume(5), 5)
    with pytest.raises(ConversionError, match=r'case PANCREAS_0001: 2 DICOM series'):
        run(['-i', dicom_release, '--output', tmp_path / 'raw', '--train-list',
             write_list(tmp_path / 'train.txt', ['PANCREAS_0001']), '--test-list',
             write_list(tmp_path / 'test.txt', [])])


def test_dicom_case_folder_without_dicom_files(dicom_release, tmp_path):
    (dicom_release / 'PANCREAS_0003' / 'empty').mkdir(parents=True)
    with pytest.raises(ConversionError, match=r'case PANCREAS_0003: no readable DICOM series'):
        run(['-i', dicom_release, '--output', tmp_path / 'raw', '--labeled', 1, '--train-list',
             write_list(tmp_path / 'train.txt', ['PANCREAS_0001', 'PANCREAS_0003']), '--test-list',
             write_list(tmp_path / 'test.txt', [])])


def test_dicom_missing_case_and_only_present(dicom_release, tmp_path):
    """Default CoraNet split on a 4-case download: an error naming the missing cases, or --only-present."""
    with pytest.raises(ConversionError, match=r'missing from the input \(PANCREAS_0003'):
        run(['-i', dicom_release, '--output', tmp_path / 'raw'])
    # -i at the NBIA manifest folder (case folders two levels down) finds the same cases
    out = run(['-i', dicom_release.parent, '--output', tmp_path / 'raw', '--only-present'])
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    # CoraNet's published labeled list (0001-0012) is the default labeled set; 0013 is in its unlabeled list
    assert manifest['labeled'] == ['PANCREAS_0001', 'PANCREAS_0002']
    assert manifest['unlabeled'] == ['PANCREAS_0013'] and manifest['test'] == ['PANCREAS_0064']
    assert 'PANCREAS_0003' in manifest['dropped_missing_from_input']
    assert len(manifest['dropped_missing_from_input']) == 80 - 4


# ----------------------------------------------------------------------------------------------------------------
# h5 forms
# ----------------------------------------------------------------------------------------------------------------
def test_h5_coranet_names_default_split(tmp_path):
    src = tmp_path / 'coranet_h5'
    data = {no: write_h5(src / f'{no:04d}.h5', no) for no in (1, 2, 13, 64)}
    out = run(['-i', src, '--output', tmp_path / 'raw', '--split', 'coranet', '--only-present'])
    assert all_files(out / 'imagesTr') == ['PANCREAS_0001_0000.nii.gz', 'PANCREAS_0002_0000.nii.gz']
    assert all_files(out / 'imagesUnlabeled') == ['PANCREAS_0013_0000.nii.gz']
    assert all_files(out / 'labelsTs') == ['PANCREAS_0064.nii.gz']
    assert all_files(out / 'labelsTr') == ['PANCREAS_0001.nii.gz', 'PANCREAS_0002.nii.gz']
    img = sitk.ReadImage(str(out / 'imagesTr' / 'PANCREAS_0002_0000.nii.gz'))
    assert img.GetSize() == (16, 12, 8) and img.GetSpacing() == (1.0, 1.0, 1.0)
    image_xyz, label_xyz = data[2]
    # (x, y, z) h5 order: voxel (x, y, z) of the h5 is pixel (x, y, z) of the NIfTI
    assert img.GetPixel(15, 0, 7) == pytest.approx(float(image_xyz[15, 0, 7]))
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), image_xyz.transpose(2, 1, 0))
    lab = sitk.ReadImage(str(out / 'labelsTs' / 'PANCREAS_0064.nii.gz'))
    assert lab.GetPixel(15, 0, 7) == 1 and lab.GetPixel(0, 0, 0) == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), data[64][1].transpose(2, 1, 0))
    ds = json.loads((out / 'dataset.json').read_text())
    assert ds['channel_names'] == {'0': 'noNorm'} and ds['numTraining'] == 2


def test_h5_mcnet_names_and_split(tmp_path):
    src = tmp_path / 'Pancreas_h5'
    for no in (57, 18, 62, 50):  # MC-Net+ train starts 0057, 0018, 0062; 0050 is its first test case
        write_h5(src / f'image{no:04d}_norm.h5', no, label_dtype=np.float32)
    out = run(['-i', tmp_path, '--output', tmp_path / 'raw', '--split', 'mcnet', '--labeled', 2, '--only-present',
               '--h5-channel-name', 'zscore'])
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    assert manifest['labeled'] == ['PANCREAS_0057', 'PANCREAS_0018']
    assert manifest['unlabeled'] == ['PANCREAS_0062'] and manifest['test'] == ['PANCREAS_0050']
    assert not (out / 'labelsTr' / 'PANCREAS_0062.nii.gz').exists()
    assert set(np.unique(load(out / 'labelsTr' / 'PANCREAS_0018.nii.gz'))) == {0, 1}
    assert sitk.ReadImage(str(out / 'labelsTr' / 'PANCREAS_0018.nii.gz')).GetPixelID() == sitk.sitkUInt8
    assert json.loads((out / 'dataset.json').read_text())['channel_names'] == {'0': 'zscore'}


def test_h5_mcf_names_with_user_lists_and_labeled_list(tmp_path):
    src = tmp_path / 'mcf'
    for no in (1, 2, 3, 63):
        write_h5(src / f'PANCREAS_{no:04d}.h5', no)
    train = write_list(tmp_path / 'train.txt', ['PANCREAS_0001.h5', 'PANCREAS_0002.h5', 'PANCREAS_0003.h5'])
    test = write_list(tmp_path / 'test.txt', ['PANCREAS_0063.h5'])
    labeled = write_list(tmp_path / 'lab.txt', ['PANCREAS_0003'])
    out = run(['-i', src, '--output', tmp_path / 'raw', '--split', 'mcf_fold0', '--train-list', train,
               '--test-list', test, '--labeled-list', labeled, '-np', 2])
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    assert manifest['labeled'] == ['PANCREAS_0003']
    assert manifest['unlabeled'] == ['PANCREAS_0001', 'PANCREAS_0002']
    assert manifest['split'] == 'mcf_fold0 (user lists)'
    assert all_files(out / 'labelsTr') == ['PANCREAS_0003.nii.gz']
    assert all_files(out / 'labelsTs') == ['PANCREAS_0063.nii.gz']


def test_h5_wrong_keys(tmp_path):
    src = tmp_path / 'h5'
    write_h5(src / '0001.h5', 1, label_key='seg')
    with pytest.raises(ConversionError, match=r"(?i)case PANCREAS_0001: .*0001\.h5 has keys \['image', 'seg'\].*"
                                              r"missing \['label'\]"):
        run(['-i', src, '--output', tmp_path / 'raw', '--train-list', write_list(tmp_path / 't.txt', ['0001']),
             '--test-list', write_list(tmp_path / 'e.txt', [])])
    assert not (tmp_path / 'raw' / 'Dataset104_PancreasCT').exists()
    assert [p.name for p in (tmp_path / 'raw').iterdir()] == []  # temporary folder removed too


def test_h5_unlabeled_case_needs_no_label_key(tmp_path):
    src = tmp_path / 'h5'
    write_h5(src / '0001.h5', 1)
    write_h5(src / '0002.h5', 2, label_key='other')
    out = run(['-i', src, '--output', tmp_path / 'raw', '--labeled', 1, '--test-list',
               write_list(tmp_path / 'e.txt', []), '--train-list', write_list(tmp_path / 't.txt', ['0001', '0002'])])
    assert (out / 'imagesUnlabeled' / 'PANCREAS_0002_0000.nii.gz').is_file()


def test_h5_shape_mismatch(tmp_path):
    src = tmp_path / 'h5'
    write_h5(src / '0001.h5', 1, label_shape=(16, 12, 7))
    with pytest.raises(ConversionError, match=r'case PANCREAS_0001: .*0001\.h5 image shape \(16, 12, 8\) != '
                                              r'label shape \(16, 12, 7\)'):
        run(['-i', src, '--output', tmp_path / 'raw', '--train-list', write_list(tmp_path / 't.txt', ['0001']),
             '--test-list', write_list(tmp_path / 'e.txt', [])])


def test_h5_non_binary_label(tmp_path):
    src = tmp_path / 'h5'
    path = src / '0001.h5'
    write_h5(path, 1)
    with h5py.File(path, 'a') as f:
        f['label'][0, 0, 0] = 2
    with pytest.raises(ConversionError, match=r'(?i)case PANCREAS_0001: label .*0001\.h5 contains values \[2\]'):
        run(['-i', src, '--output', tmp_path / 'raw', '--train-list', write_list(tmp_path / 't.txt', ['0001']),
             '--test-list', write_list(tmp_path / 'e.txt', [])])


def test_h5_two_releases_mixed(tmp_path):
    write_h5(tmp_path / 'a' / '0001.h5', 1)
    write_h5(tmp_path / 'b' / 'image0001_norm.h5', 1)
    with pytest.raises(ConversionError, match=r'Two h5 files map to case PANCREAS_0001'):
        run(['-i', tmp_path, '--output', tmp_path / 'raw'])


def test_unknown_case_id_in_list(tmp_path):
    write_h5(tmp_path / 'h5' / '0001.h5', 1)
    bad = write_list(tmp_path / 'lab.txt', ['0001', 'PANCREAS_0099'])
    with pytest.raises(ConversionError, match=r"Unknown case ID 'PANCREAS_0099' in .*lab\.txt"):
        run(['-i', tmp_path / 'h5', '--output', tmp_path / 'raw', '--labeled-list', bad])
    not_in_train = write_list(tmp_path / 'lab2.txt', ['0064'])
    with pytest.raises(ConversionError, match=r"Unknown case ID 'PANCREAS_0064' in the labeled list .*lab2\.txt.*"
                                              r"it is in the test list"):
        run(['-i', tmp_path / 'h5', '--output', tmp_path / 'raw', '--labeled-list', not_in_train])


def test_missing_input_folder(tmp_path):
    with pytest.raises(ConversionError, match=r'Input folder .*nothing_here does not exist'):
        run(['-i', tmp_path / 'nothing_here', '--output', tmp_path / 'raw'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConversionError, match=r'No Pancreas-CT data found in .*empty'):
        run(['-i', tmp_path / 'empty', '--output', tmp_path / 'raw'])


def test_existing_output_needs_overwrite(tmp_path, monkeypatch, capsys):
    src = tmp_path / 'h5'
    write_h5(src / '0001.h5', 1)
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'raw'))  # default output = $nnUNet_raw
    argv = ['-i', str(src), '--train-list', str(write_list(tmp_path / 't.txt', ['0001'])), '--test-list',
            str(write_list(tmp_path / 'e.txt', []))]
    assert pancreas.main(argv) == 0
    target = tmp_path / 'raw' / 'Dataset104_PancreasCT'
    (target / 'marker').write_text('old')
    assert pancreas.main(argv) == 2
    err = capsys.readouterr().err
    assert 'Dataset104_PancreasCT already exists; pass --overwrite' in err
    assert (target / 'marker').is_file()  # untouched
    assert pancreas.main(argv + ['--overwrite']) == 0
    assert not (target / 'marker').exists() and (target / 'labelsTr' / 'PANCREAS_0001.nii.gz').is_file()


def test_output_passes_nnunet_dataset_check(dicom_release, tmp_path, verify_dataset_in_process):
    """nnU-Net's own verify_dataset_integrity accepts the DICOM-converted output (incl. the reoriented label)."""
    out = run(['-i', dicom_release, '--output', tmp_path / 'raw', '--train-list',
               write_list(tmp_path / 'train.txt', ['PANCREAS_0001', 'PANCREAS_0002', 'PANCREAS_0013']),
               '--test-list', write_list(tmp_path / 'test.txt', ['PANCREAS_0064']), '--labeled', 2])
    verify_dataset_in_process(out)
