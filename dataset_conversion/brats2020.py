"""BraTS 2020 training data -> nnU-Net v2 raw dataset with labeled / unlabeled / test subsets.

Input: ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_XXX/BraTS20_Training_XXX_{flair,t1,t1ce,t2,seg}.nii[.gz]``
(``-i`` may be that folder or its parent). Some Kaggle mirrors name case 355's label ``W39_1998.09.19_Segm.nii``;
it is used when ``_seg`` is missing.

Channels (``--modalities``): ``flair`` (default; the SFPC / SSL4MIS single-channel protocol) or ``all`` =
FLAIR, T1, T1ce, T2 in that order (FLAIR stays channel 0000 in both modes). Channel names are the modality names,
so nnU-Net z-scores each image (MRI has no absolute intensity scale).

Labels (``--labels``): ``wt`` (default) = whole tumour, seg > 0 -> 1; ``regions`` = nnU-Net's region-based BraTS
training: seg 2 (edema) -> 1, 1 (necrotic / non-enhancing core) -> 2, 4 (enhancing) -> 3, with dataset.json regions
whole tumour [1, 2, 3], tumour core [2, 3], enhancing tumour [3].

Splits (``--split``):
- ``seeded`` (default): this project's split of the 369 training cases, NOT a published one (SFPC published none):
  test = 74 cases (20 %), training = 295 in a seeded pseudo-random order; ``--labeled-fraction 0.1`` / ``0.2`` take
  the first 30 / 59. Shipped as ``splits/brats2020_seeded_{train,test}.txt``; ``seeded_split()`` regenerates them
  from the seed (order by SHA-256 of "<seed>:<ID>", independent of any RNG implementation); ``--seed`` picks another.
- ``ssl4mis2019``: the SSL4MIS BraTS2019 lists (250 train / 25 val / 60 test) mapped to BraTS20 IDs through the
  release's ``name_mapping.csv``. Only cases present in both years are used; the val cases and the BraTS2020-only
  cases are left out of the output (recorded in semiseg_split.json), matching SSL4MIS's training pool.
"""
from __future__ import annotations

import csv
import hashlib
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dataset_conversion.common import (
    accept_underscore_spellings,
    ROLE_LABELED, ROLE_TEST, ROLE_UNLABELED, ConversionError, DatasetWriter, build_parser, check_finite_voxels,
    check_ids_known,
    check_image_integrity, check_label_values, check_labeled_in_train, dataset_folder_name, load_packaged_list,
    output_paths, parallel_map, read_id_list, spacing_outlier_warnings, resolve_output_root, resolve_split, run_main,
    write_dataset_json, write_json, write_split_manifest)

NUM_CASES = 369
ALL_IDS = [f'BraTS20_Training_{i:03d}' for i in range(1, NUM_CASES + 1)]
CASE_ID_RE = re.compile(r'^BraTS20_Training_\d{3}$')
RELEASE_FOLDER = 'MICCAI_BraTS2020_TrainingData'
MODALITIES_ALL = ('flair', 't1', 't1ce', 't2')
CHANNEL_NAMES = {'flair': 'FLAIR', 't1': 'T1', 't1ce': 'T1ce', 't2': 'T2'}
# Known alternative label file names in some mirrors (Kaggle: case 355).
LABEL_FALLBACK_NAMES = ('W39_1998.09.19_Segm.nii', 'W39_1998.09.19_Segm.nii.gz')
BRATS_LABEL_VALUES = (0, 1, 2, 4)
# BraTS 1 = necrotic / non-enhancing core, 2 = edema, 4 = enhancing -> nnU-Net's ordering for nested regions.
REGION_REMAP = {0: 0, 1: 2, 2: 1, 4: 3}
SEEDED_DEFAULT_SEED = 2020
SEEDED_NUM_TEST = 74
SEEDED_TRAIN_FILE, SEEDED_TEST_FILE = 'brats2020_seeded_train.txt', 'brats2020_seeded_test.txt'
SSL4MIS_FILES = {s: f'brats2019_ssl4mis_{s}.txt' for s in ('train', 'val', 'test')}


# ----------------------------------------------------------------------------------------------------------------
# splits
# ----------------------------------------------------------------------------------------------------------------
def seeded_split(seed: int = SEEDED_DEFAULT_SEED, ids: Sequence[str] = tuple(ALL_IDS),
                 num_test: int = SEEDED_NUM_TEST) -> Tuple[List[str], List[str]]:
    """(train in seeded order, test sorted). A hash order is reproducible on every platform and Python version."""
    order = sorted(ids, key=lambda i: hashlib.sha256(f'{seed}:{i}'.encode()).hexdigest())
    return order[num_test:], sorted(order[:num_test])


def read_name_mapping(path: Path) -> Dict[str, str]:
    """BraTS19 subject ID -> BraTS20 subject ID from name_mapping.csv (rows with NA/empty 2019 IDs skipped)."""
    if not path.is_file():
        raise ConversionError(f'{path} not found: --split ssl4mis2019 needs the name_mapping.csv of the BraTS2020 '
                              f'training release; pass --name-mapping FILE.')
    with open(path, newline='') as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        need = ('BraTS_2019_subject_ID', 'BraTS_2020_subject_ID')
        if not all(n in fields for n in need):
            raise ConversionError(f'{path} has columns {fields}, expected {list(need)} (name_mapping.csv of the '
                                  f'BraTS2020 release). Pass the right file with --name-mapping.')
        mapping = {}
        for row in reader:
            row = {(k or '').strip(): (v or '').strip() for k, v in row.items()}
            b19, b20 = row['BraTS_2019_subject_ID'], row['BraTS_2020_subject_ID']
            if b19 and b19.upper() != 'NA' and b20 and b20.upper() != 'NA':
                mapping[b19] = b20
    return mapping


def ssl4mis2019_lists(mapping: Dict[str, str]) -> Tuple[List[str], List[str], dict]:
    """SSL4MIS train/test lists mapped to BraTS20 IDs (list order kept) and a record of what was left out."""
    mapped = {}
    unmapped = {}
    for part, fname in SSL4MIS_FILES.items():
        ids19 = load_packaged_list(fname)
        mapped[part] = [mapping[i] for i in ids19 if i in mapping]
        unmapped[part] = [i for i in ids19 if i not in mapping]
    used = set(mapped['train']) | set(mapped['val']) | set(mapped['test'])
    record = {'ssl4mis2019_not_in_name_mapping': unmapped,
              'excluded_ssl4mis_val': mapped['val'],
              'excluded_brats2020_only': [i for i in ALL_IDS if i not in used]}
    return mapped['train'], mapped['test'], record


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ----------------------------------------------------------------------------------------------------------------
# input discovery
# ----------------------------------------------------------------------------------------------------------------
def release_folder(root: Path) -> Path:
    """-i may be the release folder itself or a folder containing MICCAI_BraTS2020_TrainingData/ directly or one
    level down (Kaggle: BraTS2020_TrainingData/MICCAI_BraTS2020_TrainingData/)."""
    if (root / RELEASE_FOLDER).is_dir():
        return root / RELEASE_FOLDER
    nested = sorted(p / RELEASE_FOLDER for p in root.iterdir() if (p / RELEASE_FOLDER).is_dir())
    if len(nested) > 1:
        raise ConversionError(f'{root} contains several {RELEASE_FOLDER} folders ({", ".join(map(str, nested))}); '
                              f'pass the one to convert with -i.')
    return nested[0] if nested else root


def find_cases(folder: Path) -> Dict[str, Path]:
    cases = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and CASE_ID_RE.match(p.name)}
    if not cases:
        raise ConversionError(f'No BraTS20_Training_XXX folders in {folder}. Point -i at '
                              f'{RELEASE_FOLDER}/ (or its parent) of the BraTS2020 training download.')
    return cases


def _nifti(case_dir: Path, stem: str) -> Optional[Path]:
    for ending in ('.nii.gz', '.nii'):
        p = case_dir / f'{stem}{ending}'
        if p.is_file():
            return p
    return None


def case_files(case_id: str, case_dir: Path, modalities: Sequence[str], need_label: bool
               ) -> Tuple[List[Path], Optional[Path]]:
    """Image files in channel order and the label file (None when not needed)."""
    images = []
    for m in modalities:
        p = _nifti(case_dir, f'{case_id}_{m}')
        if p is None:
            raise ConversionError(f'case {case_id}: {case_dir}/{case_id}_{m}.nii.gz (or .nii) is missing. '
                                  f'Re-download the case, or leave it out with --train-list/--test-list.')
        images.append(p)
    if not need_label:
        return images, None
    label = _nifti(case_dir, f'{case_id}_seg')
    if label is None:
        label = next((case_dir / n for n in LABEL_FALLBACK_NAMES if (case_dir / n).is_file()), None)
    if label is None:
        raise ConversionError(f'case {case_id} has no label: {case_dir}/{case_id}_seg.nii.gz (or .nii) is '
                              f'missing. Add it, or make the case unlabeled (--labeled-list) / drop it from the '
                              f'lists (--train-list/--test-list).')
    return images, label


# ----------------------------------------------------------------------------------------------------------------
# per-case conversion (module level: runs in worker processes)
# ----------------------------------------------------------------------------------------------------------------
def _same_grid(a, b) -> bool:
    return a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-3, atol=0)


def convert_label(seg: np.ndarray, mode: str, case_id: str, source: str) -> np.ndarray:
    check_label_values(case_id, source, seg, BRATS_LABEL_VALUES)
    seg = seg.astype(np.uint8)
    if mode == 'wt':
        return (seg > 0).astype(np.uint8)
    lut = np.zeros(5, dtype=np.uint8)
    for src, dst in REGION_REMAP.items():
        lut[src] = dst
    return lut[seg]


def convert_case(job: dict) -> dict:
    import SimpleITK as sitk

    case_id, role, out = job['case_id'], job['role'], Path(job['out'])
    reference = None
    for channel, path in enumerate(job['images']):
        check_image_integrity(path, case_id)
        try:
            img = sitk.ReadImage(path)
        except RuntimeError as e:
            raise ConversionError(f'case {case_id}: cannot read {path} ({e}). Re-download the case.') from e
        if img.GetDimension() != 3:
            raise ConversionError(f'case {case_id}: {path} is {img.GetDimension()}D, expected a 3D volume.')
        check_finite_voxels(img, case_id, path)
        if reference is None:
            reference = img
        elif not _same_grid(reference, img):
            raise ConversionError(f'case {case_id}: {path} has shape {img.GetSize()} / spacing {img.GetSpacing()} '
                                  f'but {job["images"][0]} has {reference.GetSize()} / {reference.GetSpacing()}; '
                                  f'BraTS modalities must be co-registered. Re-download the case.')
        if img.GetPixelID() == sitk.sitkFloat64:
            img = sitk.Cast(img, sitk.sitkFloat32)  # halves the size; MRI intensities need no double precision
        img.CopyInformation(reference)  # identical headers across channels (nnU-Net checks them)
        sitk.WriteImage(img, str(output_paths(out, role, case_id, channel)[0]), useCompression=True)
    if job['label'] is not None:
        path = job['label']
        check_image_integrity(path, case_id)
        try:
            seg = sitk.ReadImage(path)
        except RuntimeError as e:
            raise ConversionError(f'case {case_id}: cannot read label {path} ({e}). Re-download it.') from e
        if not _same_grid(reference, seg):
            raise ConversionError(f'case {case_id}: label {path} has shape {seg.GetSize()} / spacing '
                                  f'{tuple(round(s, 3) for s in seg.GetSpacing())} but the image has '
                                  f'{reference.GetSize()} / {tuple(round(s, 3) for s in reference.GetSpacing())}. '
                                  f'Check that the label belongs to this case.')
        out_seg = sitk.GetImageFromArray(convert_label(sitk.GetArrayFromImage(seg), job['labels'], case_id, path))
        out_seg.CopyInformation(reference)
        sitk.WriteImage(out_seg, str(output_paths(out, role, case_id)[1]), useCompression=True)
    return {'case_id': case_id, 'size_xyz': list(reference.GetSize()),
            'spacing_xyz': [float(s) for s in reference.GetSpacing()]}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def get_parser():
    p = build_parser(
        description='Convert the BraTS2020 training release into an nnU-Net v2 raw dataset with imagesTr/labelsTr '
                    '(labeled), imagesUnlabeled and imagesTs/labelsTs.',
        default_dataset_id=103, default_name='BraTS2020', split_choices=('seeded', 'ssl4mis2019'),
        default_split='seeded',
        input_help=f'{RELEASE_FOLDER} folder of the download (or the folder containing it)')
    p.add_argument('--labeled-fraction', dest='labeled_fraction', type=float, default=None, metavar='F',
                   help='labeled set = first round(F * training cases) of the training list (0.1 / 0.2 are the '
                        'literature protocols); alternative to --labeled / --labeled-list')
    p.add_argument('--modalities', choices=('flair', 'all'), default='flair',
                   help='flair: FLAIR only (SFPC protocol); all: FLAIR, T1, T1ce, T2 as channels 0000-0003')
    p.add_argument('--labels', choices=('wt', 'regions'), default='wt',
                   help='wt: whole tumour binary (seg > 0); regions: nnU-Net region-based WT/TC/ET labels')
    p.add_argument('--seed', type=int, default=SEEDED_DEFAULT_SEED,
                   help=f'--split seeded: seed of the split ({SEEDED_DEFAULT_SEED} = the shipped lists)')
    p.add_argument('--name-mapping', dest='name_mapping', type=Path, default=None,
                   help='--split ssl4mis2019: name_mapping.csv (default: the one in the release folder)')
    return accept_underscore_spellings(p)


def _split_lists(args, folder: Path) -> Tuple[List[str], List[str], str, str, dict]:
    extra: dict = {}
    if args.split == 'seeded':
        if args.seed == SEEDED_DEFAULT_SEED:
            train, test = load_packaged_list(SEEDED_TRAIN_FILE), load_packaged_list(SEEDED_TEST_FILE)
            train_src, test_src = (f'dataset_conversion/splits/{SEEDED_TRAIN_FILE}',
                                   f'dataset_conversion/splits/{SEEDED_TEST_FILE}')
        else:
            train, test = seeded_split(args.seed)
            train_src = test_src = f'seeded_split(seed={args.seed}) in dataset_conversion/brats2020.py'
        extra['note'] = 'project split (seeded), not a published one: SFPC published no BraTS2020 split'
    else:
        mapping_file = Path(args.name_mapping) if args.name_mapping else folder / 'name_mapping.csv'
        train, test, extra = ssl4mis2019_lists(read_name_mapping(mapping_file))
        train_src = (f'dataset_conversion/splits/{SSL4MIS_FILES["train"]} mapped through {mapping_file}')
        test_src = f'dataset_conversion/splits/{SSL4MIS_FILES["test"]} mapped through {mapping_file}'
    if args.train_list is not None:
        train, train_src = read_id_list(args.train_list), str(args.train_list)
        check_ids_known(train, ALL_IDS, train_src)
    if args.test_list is not None:
        test, test_src = read_id_list(args.test_list), str(args.test_list)
        check_ids_known(test, ALL_IDS, test_src)
    return train, test, train_src, test_src, extra


def convert(args) -> Path:
    root = Path(args.input)
    if not root.is_dir():
        raise ConversionError(f'Input folder {root} does not exist: pass -i with the BraTS2020 training download '
                              f'({RELEASE_FOLDER}).')
    n_given = sum(x is not None for x in (args.labeled, args.labeled_list, args.labeled_fraction))
    if n_given > 1:
        raise ConversionError('Give only one of --labeled, --labeled-list and --labeled-fraction.')
    if args.labeled_fraction is not None and not 0 < args.labeled_fraction <= 1:
        raise ConversionError(f'--labeled-fraction {args.labeled_fraction} must be in (0, 1], e.g. 0.1 for 10 %.')
    output_root = resolve_output_root(args.output)
    folder_name = dataset_folder_name(args.dataset_id, args.name)
    # fail before any slow work
    DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,)).check_target()

    folder = release_folder(root)
    cases = find_cases(folder)
    train, test, train_src, test_src, extra = _split_lists(args, folder)

    labeled_n, labeled_ids, labeled_src = args.labeled, None, None
    if args.labeled_list is not None:
        labeled_ids, labeled_src = read_id_list(args.labeled_list), str(args.labeled_list)
        check_ids_known(labeled_ids, ALL_IDS, labeled_src)
        check_labeled_in_train(labeled_ids, labeled_src, train, train_src, test)
        if args.only_present:
            labeled_ids = [i for i in labeled_ids if i in cases]
    if args.labeled_fraction is not None:
        pool = [i for i in train if i in cases] if args.only_present else train
        labeled_n = max(1, round_half_up(args.labeled_fraction * len(pool)))
        extra['labeled_fraction'] = args.labeled_fraction
    assignment = resolve_split(train, test, train_source=train_src, test_source=test_src, labeled_n=labeled_n,
                               labeled_ids=labeled_ids, labeled_source=labeled_src, present=cases.keys(),
                               only_present=args.only_present, found_lists_dir=args.write_found_lists)

    modalities = ('flair',) if args.modalities == 'flair' else MODALITIES_ALL
    # Resolve every file before writing anything: a missing file fails the run in seconds, not after an hour.
    jobs = []
    for role, ids in ((ROLE_LABELED, assignment.labeled), (ROLE_UNLABELED, assignment.unlabeled),
                      (ROLE_TEST, assignment.test)):
        for cid in ids:
            images, label = case_files(cid, cases[cid], modalities, need_label=role != ROLE_UNLABELED)
            jobs.append({'case_id': cid, 'role': role, 'images': [str(p) for p in images],
                         'label': str(label) if label else None, 'labels': args.labels})

    if args.labels == 'wt':
        labels, region_extra = {'background': 0, 'whole_tumor': 1}, {}
    else:
        labels = {'background': 0, 'whole tumor': [1, 2, 3], 'tumor core': [2, 3], 'enhancing tumor': [3]}
        region_extra = {'regions_class_order': [1, 2, 3]}
    with DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,),
                       target_spacing=args.target_spacing) as writer:
        for job in jobs:
            job['out'] = str(writer.tmp)
        infos = parallel_map(convert_case, jobs, args.num_processes, desc='BraTS2020')
        spacing_outlier_warnings({i['case_id']: i['spacing_xyz'] for i in infos}, assignment.labeled)
        _write_dataset_json(writer.tmp, modalities, labels, len(assignment.labeled), folder_name,
                            numUnlabeled=len(assignment.unlabeled), numTest=len(assignment.test), **region_extra)
        write_split_manifest(
            writer.tmp, dataset='BraTS2020', converter='dataset_conversion.brats2020', source_format='nifti',
            input_folder=folder, split_name=args.split if args.train_list is None else f'{args.split} (user lists)',
            assignment=assignment, options=vars(args),
            extra={**extra, 'modalities': list(modalities), 'label_mode': args.labels})
    return writer.target


def _write_dataset_json(folder: Path, modalities, labels: dict, num_training: int, name: str, **extra) -> None:
    common = dict(name=name, description='BraTS2020 training data, semi-supervised split; see semiseg_split.json',
                  reference='https://www.med.upenn.edu/cbica/brats2020/', **extra)
    channels = {i: CHANNEL_NAMES[m] for i, m in enumerate(modalities)}
    if 'regions_class_order' not in extra:
        write_dataset_json(folder, channels, labels, num_training, **common)
        return
    # write_dataset_json insists on consecutive integer labels; region labels are lists, so write through a
    # placeholder label map and patch the labels in afterwards (same file, same keys otherwise).
    data = write_dataset_json(folder, channels, {k: i for i, k in enumerate(labels)}, num_training, **common)
    data['labels'] = labels
    write_json(data, Path(folder) / 'dataset.json')


def main(argv=None) -> int:
    return run_main(convert, get_parser(), argv)


if __name__ == '__main__':
    raise SystemExit(main())
