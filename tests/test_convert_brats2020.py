"""BraTS2020 converter on a synthetic release: tiny 16 x 16 x 8 NIfTI cases in the MICCAI_BraTS2020_TrainingData
layout (gzip and Kaggle-style uncompressed, case 355's odd label name) plus a name_mapping.csv."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import brats2020
from dataset_conversion.common import ConversionError, load_packaged_list

SHAPE_ZYX = (8, 16, 16)
MODS = ('flair', 't1', 't1ce', 't2')


def modality_volume(case_no: int, mod: str) -> np.ndarray:
    base = np.arange(np.prod(SHAPE_ZYX), dtype=np.int16).reshape(SHAPE_ZYX) % 97
    return (base + 100 * MODS.index(mod) + case_no).astype(np.int16)


def brats_seg() -> np.ndarray:
    seg = np.zeros(SHAPE_ZYX, np.uint8)
    seg[2, 3, 4] = 1    # necrotic / non-enhancing
    seg[3, 5, 6] = 2    # edema
    seg[4, 7, 8:10] = 4  # enhancing
    return seg


def write_vol(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((0.0, -239.0, 0.0))
    sitk.WriteImage(img, str(path))


def make_case(release: Path, case_no: int, ending='.nii.gz', seg=True, seg_name=None) -> Path:
    cid = f'BraTS20_Training_{case_no:03d}'
    d = release / cid
    d.mkdir(parents=True)
    for m in MODS:
        write_vol(d / f'{cid}_{m}{ending}', modality_volume(case_no, m))
    if seg:
        write_vol(d / (seg_name or f'{cid}_seg{ending}'), brats_seg())
    return d


def write_list(path: Path, ids) -> Path:
    path.write_text(''.join(f'{i}\n' for i in ids))
    return path


def run(argv):
    return brats2020.convert(brats2020.get_parser().parse_args([str(a) for a in argv]))


def load(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def all_files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def num(case_id: str) -> int:
    return int(case_id[-3:])


@pytest.fixture
def small_release(tmp_path):
    """2 training + 1 test case of user lists (ids 1, 2, 3); returns (release, train list, test list)."""
    release = tmp_path / 'MICCAI_BraTS2020_TrainingData'
    for no in (1, 2, 3):
        make_case(release, no)
    return (release, write_list(tmp_path / 'train.txt', ['BraTS20_Training_002', 'BraTS20_Training_001']),
            write_list(tmp_path / 'test.txt', ['BraTS20_Training_003']))


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def test_seeded_split_is_shipped_and_reproducible():
    train, test = load_packaged_list('brats2020_seeded_train.txt'), load_packaged_list('brats2020_seeded_test.txt')
    assert (train, test) == brats2020.seeded_split(2020)
    assert len(train) == 295 and len(test) == 74
    assert sorted(train + test) == brats2020.ALL_IDS
    other_train, other_test = brats2020.seeded_split(7)
    assert other_test != test and sorted(other_train + other_test) == brats2020.ALL_IDS
    # literature fractions on the seeded training list
    assert brats2020.round_half_up(0.1 * 295) == 30 and brats2020.round_half_up(0.2 * 295) == 59


def test_default_flair_wt_seeded_split_with_fraction(tmp_path):
    train_all, test_all = brats2020.seeded_split()
    present_train, present_test = train_all[:4], test_all[:2]
    release = tmp_path / 'dl' / 'BraTS2020_TrainingData' / 'MICCAI_BraTS2020_TrainingData'
    for cid in present_train + present_test:
        make_case(release, num(cid))
    # -i may be a parent of the release folder (Kaggle nests it one level deeper)
    out = run(['-i', tmp_path / 'dl', '--output', tmp_path / 'raw', '--only-present', '--labeled-fraction', 0.5])
    assert out == tmp_path / 'raw' / 'Dataset103_BraTS2020'
    lab, unl, tst = present_train[:2], present_train[2:], present_test
    assert all_files(out / 'imagesTr') == sorted(f'{c}_0000.nii.gz' for c in lab)
    assert all_files(out / 'labelsTr') == sorted(f'{c}.nii.gz' for c in lab)
    assert all_files(out / 'imagesUnlabeled') == sorted(f'{c}_0000.nii.gz' for c in unl)
    assert all_files(out / 'imagesTs') == sorted(f'{c}_0000.nii.gz' for c in tst)
    assert all_files(out / 'labelsTs') == sorted(f'{c}.nii.gz' for c in tst)
    # no label of an unlabeled case anywhere in the output
    assert not any(c in f for c in unl for f in all_files(out) if not f.startswith('imagesUnlabeled'))
    for cid in lab:
        img = sitk.ReadImage(str(out / 'imagesTr' / f'{cid}_0000.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), modality_volume(num(cid), 'flair'))
        assert img.GetSpacing() == (1.0, 1.0, 1.0)
        seg = load(out / 'labelsTr' / f'{cid}.nii.gz')
        np.testing.assert_array_equal(seg, (brats_seg() > 0).astype(np.uint8))
    ds = json.loads((out / 'dataset.json').read_text())
    assert ds['channel_names'] == {'0': 'FLAIR'}
    assert ds['labels'] == {'background': 0, 'whole_tumor': 1} and 'regions_class_order' not in ds
    assert ds['numTraining'] == 2 and ds['numUnlabeled'] == 2 and ds['numTest'] == 2
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    assert (manifest['labeled'], manifest['unlabeled'], manifest['test']) == (lab, unl, tst)
    assert manifest['train_list'] == 'dataset_conversion/splits/brats2020_seeded_train.txt'
    assert manifest['labeled_fraction'] == 0.5 and len(manifest['dropped_missing_from_input']) == 369 - 6


def test_all_modalities_and_regions(small_release, tmp_path):
    release, train, test = small_release
    out = run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test,
               '--labeled', 1, '--modalities', 'all', '--labels', 'regions', '-np', 2])
    for ch, mod in enumerate(MODS):  # FLAIR first, then T1, T1ce, T2
        np.testing.assert_array_equal(load(out / 'imagesTr' / f'BraTS20_Training_002_{ch:04d}.nii.gz'),
                                      modality_volume(2, mod))
        assert (out / 'imagesUnlabeled' / f'BraTS20_Training_001_{ch:04d}.nii.gz').is_file()
        assert (out / 'imagesTs' / f'BraTS20_Training_003_{ch:04d}.nii.gz').is_file()
    seg = load(out / 'labelsTs' / 'BraTS20_Training_003.nii.gz')
    # BraTS 1 (core) -> 2, 2 (edema) -> 1, 4 (enhancing) -> 3
    assert (seg[2, 3, 4], seg[3, 5, 6], seg[4, 7, 8], seg[4, 7, 9], seg[0, 0, 0]) == (2, 1, 3, 3, 0)
    assert sorted(np.unique(seg).tolist()) == [0, 1, 2, 3]
    ds = json.loads((out / 'dataset.json').read_text())
    assert ds['channel_names'] == {'0': 'FLAIR', '1': 'T1', '2': 'T1ce', '3': 'T2'}
    assert ds['labels'] == {'background': 0, 'whole tumor': [1, 2, 3], 'tumor core': [2, 3],
                            'enhancing tumor': [3]}
    assert ds['regions_class_order'] == [1, 2, 3] and ds['numTraining'] == 1
    assert all_files(out / 'labelsTr') == ['BraTS20_Training_002.nii.gz']


def test_kaggle_uncompressed_and_case_355_label_name(tmp_path):
    release = tmp_path / 'MICCAI_BraTS2020_TrainingData'
    make_case(release, 355, ending='.nii', seg_name='W39_1998.09.19_Segm.nii')
    make_case(release, 356, ending='.nii')
    out = run(['-i', release, '--output', tmp_path / 'raw', '--train-list',
               write_list(tmp_path / 't.txt', ['BraTS20_Training_355']), '--test-list',
               write_list(tmp_path / 'e.txt', ['BraTS20_Training_356'])])
    np.testing.assert_array_equal(load(out / 'labelsTr' / 'BraTS20_Training_355.nii.gz'),
                                  (brats_seg() > 0).astype(np.uint8))
    assert (out / 'labelsTs' / 'BraTS20_Training_356.nii.gz').is_file()


def test_ssl4mis2019_split_through_name_mapping(tmp_path):
    train19 = load_packaged_list('brats2019_ssl4mis_train.txt')
    test19 = load_packaged_list('brats2019_ssl4mis_test.txt')
    val19 = load_packaged_list('brats2019_ssl4mis_val.txt')
    # BraTS20 numbers deliberately not in list order: the converter must follow the SSL4MIS order
    mapping = {train19[0]: 4, train19[1]: 1, train19[2]: 3, train19[3]: 2, test19[0]: 6, test19[1]: 5, val19[0]: 7}
    release = tmp_path / 'MICCAI_BraTS2020_TrainingData'
    rows = ['Grade,BraTS_2017_subject_ID,BraTS_2018_subject_ID,TCGA_TCIA_subject_ID,BraTS_2019_subject_ID,'
            'BraTS_2020_subject_ID']
    rows += [f'HGG,NA,NA,NA,{b19},BraTS20_Training_{n:03d}' for b19, n in mapping.items()]
    rows += ['HGG,NA,NA,NA,NA,BraTS20_Training_008']  # BraTS2020-only case
    for n in range(1, 9):
        make_case(release, n, seg=n != 3)  # case 3 is unlabeled here: it needs no label file
    (release / 'name_mapping.csv').write_text('\n'.join(rows) + '\n')
    out = run(['-i', release, '--output', tmp_path / 'raw', '--split', 'ssl4mis2019', '--labeled-fraction', 0.5])
    manifest = json.loads((out / 'semiseg_split.json').read_text())
    assert manifest['labeled'] == ['BraTS20_Training_004', 'BraTS20_Training_001']
    assert manifest['unlabeled'] == ['BraTS20_Training_003', 'BraTS20_Training_002']
    assert manifest['test'] == ['BraTS20_Training_006', 'BraTS20_Training_005']
    assert manifest['excluded_ssl4mis_val'] == ['BraTS20_Training_007']
    assert 'BraTS20_Training_008' in manifest['excluded_brats2020_only']
    assert len(manifest['ssl4mis2019_not_in_name_mapping']['train']) == 250 - 4
    assert not any('_007' in f or '_008' in f for f in all_files(out))
    assert all_files(out / 'labelsTr') == ['BraTS20_Training_001.nii.gz', 'BraTS20_Training_004.nii.gz']


# ----------------------------------------------------------------------------------------------------------------
# errors: each names the case / file and the fix; a failed run leaves nothing behind
# ----------------------------------------------------------------------------------------------------------------
def test_missing_input_folder_and_empty_release(tmp_path):
    with pytest.raises(ConversionError, match=r'Input folder .*nope does not exist'):
        run(['-i', tmp_path / 'nope', '--output', tmp_path / 'raw'])
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ConversionError, match=r'No BraTS20_Training_XXX folders in .*empty'):
        run(['-i', tmp_path / 'empty', '--output', tmp_path / 'raw'])


def test_case_missing_from_input(small_release, tmp_path):
    release, train, _ = small_release
    with pytest.raises(ConversionError,
                       match=r'366 case\(s\) .* missing from the input \(BraTS20_Training_141, .*--only-present'):
        run(['-i', release, '--output', tmp_path / 'raw'])  # the seeded split lists all 369 cases


def test_missing_modality_file(small_release, tmp_path):
    release, train, test = small_release
    (release / 'BraTS20_Training_001' / 'BraTS20_Training_001_t1ce.nii.gz').unlink()
    argv = ['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test]
    run(argv + ['-d', 501])  # FLAIR-only does not need t1ce
    with pytest.raises(ConversionError, match=r'case BraTS20_Training_001: .*BraTS20_Training_001_t1ce\.nii\.gz'
                                              r' \(or \.nii\) is missing'):
        run(argv + ['-d', 502, '--modalities', 'all'])


def test_labeled_case_without_label(small_release, tmp_path):
    release, train, test = small_release
    (release / 'BraTS20_Training_001' / 'BraTS20_Training_001_seg.nii.gz').unlink()
    argv = ['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test]
    out = run(argv + ['--labeled', 1, '-d', 501])  # 001 is unlabeled then: fine
    assert (out / 'imagesUnlabeled' / 'BraTS20_Training_001_0000.nii.gz').is_file()
    with pytest.raises(ConversionError, match=r'case BraTS20_Training_001 has no label: .*_seg\.nii\.gz'):
        run(argv + ['-d', 502])


def test_label_shape_mismatch_leaves_nothing(small_release, tmp_path):
    release, train, test = small_release
    write_vol(release / 'BraTS20_Training_003' / 'BraTS20_Training_003_seg.nii.gz', brats_seg()[:-1])
    with pytest.raises(ConversionError, match=r'case BraTS20_Training_003: label .*_003_seg\.nii\.gz has shape '
                                              r'\(16, 16, 7\).*image has \(16, 16, 8\)'):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test])
    assert list((tmp_path / 'raw').iterdir()) == []  # the two cases converted before were in the temp folder


def test_spacing_mismatch(small_release, tmp_path):
    release, train, test = small_release
    write_vol(release / 'BraTS20_Training_002' / 'BraTS20_Training_002_seg.nii.gz', brats_seg(), (1.0, 1.0, 2.0))
    with pytest.raises(ConversionError, match=r'case BraTS20_Training_002: label .*spacing \(1\.0, 1\.0, 2\.0\)'):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test])
    write_vol(release / 'BraTS20_Training_002' / 'BraTS20_Training_002_t2.nii.gz', modality_volume(2, 't2'),
              (1.0, 1.2, 1.0))
    with pytest.raises(ConversionError, match=r'case BraTS20_Training_002: .*_t2\.nii\.gz .*co-registered'):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test,
             '--modalities', 'all'])


def test_unexpected_label_values(small_release, tmp_path):
    release, train, test = small_release
    bad = brats_seg()
    bad[0, 0, 0] = 3
    write_vol(release / 'BraTS20_Training_001' / 'BraTS20_Training_001_seg.nii.gz', bad)
    with pytest.raises(ConversionError, match=r'(?i)case BraTS20_Training_001: label .*contains values \[3\]'):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test])


def test_unknown_case_ids_in_lists(small_release, tmp_path):
    release, train, test = small_release
    bad = write_list(tmp_path / 'bad.txt', ['BraTS20_Training_001', 'BraTS20_Training_999'])
    with pytest.raises(ConversionError, match=r"Unknown case ID 'BraTS20_Training_999' in .*bad\.txt"):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', bad, '--test-list', test])
    lab = write_list(tmp_path / 'lab.txt', ['BraTS20_Training_003'])
    with pytest.raises(ConversionError, match=r"Unknown case ID 'BraTS20_Training_003' in the labeled list "
                                              r".*lab\.txt.*it is in the test list"):
        run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test,
             '--labeled-list', lab])


def test_name_mapping_missing_or_wrong(small_release, tmp_path):
    release, _, _ = small_release
    with pytest.raises(ConversionError, match=r'name_mapping\.csv not found.*--name-mapping'):
        run(['-i', release, '--output', tmp_path / 'raw', '--split', 'ssl4mis2019'])
    wrong = tmp_path / 'survival_info.csv'
    wrong.write_text('Brats20ID,Age,Survival_days\nBraTS20_Training_001,60,289\n')
    with pytest.raises(ConversionError, match=r'survival_info\.csv has columns .*BraTS_2019_subject_ID'):
        run(['-i', release, '--output', tmp_path / 'raw', '--split', 'ssl4mis2019', '--name-mapping', wrong])


def test_conflicting_labeled_options(small_release, tmp_path):
    release, train, test = small_release
    with pytest.raises(ConversionError, match=r'only one of --labeled, --labeled-list and --labeled-fraction'):
        run(['-i', release, '--output', tmp_path / 'raw', '--labeled', 1, '--labeled-fraction', 0.1])
    with pytest.raises(ConversionError, match=r'--labeled-fraction 1\.5 must be in \(0, 1\]'):
        run(['-i', release, '--output', tmp_path / 'raw', '--labeled-fraction', 1.5])


def test_existing_output_needs_overwrite(small_release, tmp_path, monkeypatch, capsys):
    release, train, test = small_release
    monkeypatch.setenv('nnUNet_raw', str(tmp_path / 'raw'))
    argv = ['-i', str(release), '--train-list', str(train), '--test-list', str(test), '--labeled', '1']
    assert brats2020.main(argv) == 0
    target = tmp_path / 'raw' / 'Dataset103_BraTS2020'
    assert brats2020.main(argv) == 2
    assert 'Dataset103_BraTS2020 already exists; pass --overwrite' in capsys.readouterr().err
    assert json.loads((target / 'dataset.json').read_text())['numTraining'] == 1
    assert brats2020.main(argv[:-1] + ['2', '--overwrite']) == 0
    assert json.loads((target / 'dataset.json').read_text())['numTraining'] == 2
    assert sorted(p.name for p in (tmp_path / 'raw').iterdir()) == ['Dataset103_BraTS2020']


@pytest.mark.parametrize('options', [[], ['--modalities', 'all', '--labels', 'regions']])
def test_output_passes_nnunet_dataset_check(small_release, tmp_path, verify_dataset_in_process, options):
    """nnU-Net's own verify_dataset_integrity (labels, channels, geometry of imagesTr/labelsTr) accepts the output."""
    release, train, test = small_release
    out = run(['-i', release, '--output', tmp_path / 'raw', '--train-list', train, '--test-list', test] + options)
    verify_dataset_in_process(out)
