"""Pancreas-CT (NIH / TCIA) -> nnU-Net v2 raw dataset with labeled / unlabeled / test subsets.

Two input forms (``--format``, detected by default):

- ``dicom``: the TCIA download (``PANCREAS_0001/<study>/<series>/*.dcm``, any depth) plus the NIH label NIfTIs
  (``label0001.nii.gz``; searched below ``-i`` or given with ``--labels-folder``). Images are written in Hounsfield
  units with their DICOM geometry; channel name ``CT`` makes nnU-Net use its CT normalisation (clipping to the
  foreground percentiles of the labeled cases, then z-scoring with their statistics).
- ``h5``: the preprocessed releases of the semi-supervised literature: CoraNet/BCP (``0001.h5``), FUSSNet
  (``data0001.h5``), MC-Net+/CauSSL (``image0001_norm.h5``), MCF (``PANCREAS_0001.h5``). Keys ``image`` and
  ``label``, arrays in (x, y, z) order, resampled to 1 mm by the releases (spacing 1 x 1 x 1 is written). Their
  intensities are already windowed to [-125, 275] HU and rescaled (CoraNet: [0, 1]; MC-Net+: z-scored), so the
  channel is named ``noNorm`` by default: the network sees exactly the intensities the literature models saw.
  ``--h5-channel-name zscore`` asks nnU-Net to z-score them again instead.

Every ID spelling is mapped to the TCIA case ID ``PANCREAS_XXXX``; the output keeps that ID.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from dataset_conversion.common import (
    accept_underscore_spellings,
    ROLE_LABELED, ROLE_TEST, ROLE_UNLABELED, ConversionError, DatasetWriter, build_parser, check_finite_voxels,
    check_image_integrity,
    check_label_values, check_labeled_in_train, spacing_outlier_warnings, dataset_folder_name, load_packaged_list,
    output_paths, parallel_map, read_h5, read_id_list, resolve_output_root, resolve_split, run_main,
    write_dataset_json, write_nifti, write_split_manifest)

NUM_IDS = 82  # TCIA numbering 0001..0082 (v2 of the collection withdrew 0025 and 0070)
# TCIA v2 withdrew these because they are the same scan as PANCREAS_0002: they must not sit on the other side of
# a train/test boundary from 0002 (MCF fold 1 does that).
DUPLICATE_SCANS = {'PANCREAS_0025': 'PANCREAS_0002', 'PANCREAS_0070': 'PANCREAS_0002'}

# split name -> (training list(s), test list). Training lists are concatenated in order ("first N" = labeled).
SPLITS: Dict[str, Tuple[Tuple[str, ...], str]] = {
    'coranet': (('pancreas_coranet_train_lab.txt', 'pancreas_coranet_train_unlab.txt'), 'pancreas_coranet_test.txt'),
    'mcnet': (('pancreas_mcnet_train.txt',), 'pancreas_mcnet_test.txt'),
    **{f'mcf_fold{k}': ((f'pancreas_mcf_fold{k}_train.txt',), f'pancreas_mcf_fold{k}_test.txt') for k in range(4)},
}
# CoraNet publishes its labeled list; it is the default labeled set of that split (the others: see --labeled).
DEFAULT_LABELED_LIST = {'coranet': 'pancreas_coranet_train_lab.txt'}

_ID_PATTERNS = [re.compile(p) for p in (
    r'^PANCREAS_(\d{4})$',      # TCIA folders, MCF h5
    r'^(\d{4})$',               # CoraNet / BCP h5 and lists
    r'^data(\d{4})$',           # FUSSNet lists
    r'^image(\d{4})(?:_norm)?$',  # MC-Net+ / CauSSL
    r'^label(\d{4})$',          # NIH label files
)]
_STRIP_SUFFIXES = ('.nii.gz', '.nii', '.h5')


def canonical_case_id(name: str) -> Optional[str]:
    """'0001.h5', 'data0001', 'image0001_norm.h5', 'PANCREAS_0001', 'label0001.nii.gz' -> 'PANCREAS_0001'.

    Returns None for names that follow none of the known spellings or are outside 0001..0082.
    """
    stem = os.path.basename(name.strip())
    for suffix in _STRIP_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    for pattern in _ID_PATTERNS:
        m = pattern.match(stem)
        if m and 1 <= int(m.group(1)) <= NUM_IDS:
            return f'PANCREAS_{int(m.group(1)):04d}'
    return None


def canonical_ids(entries: Sequence[str], source: str) -> List[str]:
    """Canonicalise a whole list; an unknown spelling or number is an error naming the list and the entry."""
    out = []
    for entry in entries:
        cid = canonical_case_id(entry)
        if cid is None:
            raise ConversionError(f'Unknown case ID {entry!r} in {source}: Pancreas-CT IDs are PANCREAS_0001.. '
                                  f'PANCREAS_{NUM_IDS:04d} (also accepted: 0001, 0001.h5, data0001, image0001, '
                                  f'image0001_norm.h5). Fix the list.')
        out.append(cid)
    return out


# ----------------------------------------------------------------------------------------------------------------
# input discovery
# ----------------------------------------------------------------------------------------------------------------
def find_h5_files(root: Path) -> Dict[str, Path]:
    """Canonical ID -> h5 file, for every h5 file below root whose name is a known spelling."""
    found: Dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            if not f.endswith('.h5'):
                continue
            cid = canonical_case_id(f)
            if cid is None:
                continue  # unrelated h5 files (e.g. checkpoints) are not an error
            path = Path(dirpath) / f
            if cid in found:
                raise ConversionError(f'Two h5 files map to case {cid}: {found[cid]} and {path} (different '
                                      f'releases mixed?). Keep one release below -i.')
            found[cid] = path
    return found


def _is_case_folder(p: Path) -> bool:
    return p.is_dir() and re.match(r'^PANCREAS_\d{4}$', p.name) is not None


def find_dicom_case_folders(root: Path) -> Dict[str, Path]:
    """Canonical ID -> PANCREAS_XXXX folder, at most two levels below -i (NBIA downloads nest them as
    manifest-<n>/Pancreas-CT/PANCREAS_0001)."""
    found: Dict[str, Path] = {}
    level = [root]
    for _depth in range(3):
        next_level = []
        for parent in level:
            for p in sorted(q for q in parent.iterdir() if q.is_dir()):
                if not _is_case_folder(p):
                    next_level.append(p)
                    continue
                cid = canonical_case_id(p.name)
                if cid is None:
                    continue
                if cid in found:
                    raise ConversionError(f'Two folders for case {cid}: {found[cid]} and {p}. Keep one below -i.')
                found[cid] = p
        level = next_level
    return found


def find_label_files(root: Path) -> Dict[str, Path]:
    """Canonical ID -> NIH label NIfTI (labelXXXX.nii[.gz]) anywhere below root."""
    found: Dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in sorted(files):
            if re.match(r'^label\d{4}\.nii(\.gz)?$', f):
                cid = canonical_case_id(f)
                if cid is not None:
                    if cid in found:
                        raise ConversionError(f'Two label files for case {cid}: {found[cid]} and '
                                              f'{Path(dirpath) / f}. Keep one.')
                    found[cid] = Path(dirpath) / f
    return found


def detect_format(root: Path) -> str:
    has_dicom = bool(find_dicom_case_folders(root))
    has_h5 = bool(find_h5_files(root))
    if has_dicom and has_h5:
        raise ConversionError(f'{root} contains both PANCREAS_XXXX DICOM folders and h5 files; pass --format '
                              f'dicom or --format h5.')
    if has_dicom:
        return 'dicom'
    if has_h5:
        return 'h5'
    raise ConversionError(f'No Pancreas-CT data found in {root}: expected PANCREAS_XXXX DICOM folders (TCIA) or '
                          f'h5 files (0001.h5, image0001_norm.h5, PANCREAS_0001.h5). Point -i at the release.')


# ----------------------------------------------------------------------------------------------------------------
# per-case conversion (module level: runs in worker processes)
# ----------------------------------------------------------------------------------------------------------------
def _binary_label(label: np.ndarray, case_id: str, source: str) -> np.ndarray:
    check_label_values(case_id, source, label, (0, 1))
    return label.astype(np.uint8)


def read_h5_case(path: Path, case_id: str, need_label: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(image, label) in SimpleITK order (z, y, x). The releases store (x, y, z). Unlabeled cases: label None
    (their label, if the release has one, is not even read)."""
    keys = ('image', 'label') if need_label else ('image',)
    data = read_h5(path, keys, case_id, release='a Pancreas-CT h5 release (CoraNet, MC-Net+, MCF)')
    image, label = data['image'], data.get('label')
    if image.ndim != 3:
        raise ConversionError(f'case {case_id}: image in {path} has shape {image.shape}, expected a 3D volume.')
    if label is not None:
        if label.shape != image.shape:
            raise ConversionError(f'case {case_id}: {path} image shape {image.shape} != label shape {label.shape}. '
                                  f'The file is inconsistent; re-download it.')
        label = _binary_label(label, case_id, str(path)).transpose(2, 1, 0)
    return image.astype(np.float32).transpose(2, 1, 0), label


# Pancreas parenchyma in portal-venous CT lies well inside this HU window; a label that lands on air, fat or bone
# (flipped / shifted against the image) fails it. Loose bounds and a 90 % quorum tolerate partial-volume voxels.
SOFT_TISSUE_HU = (-200, 400)
MIN_SOFT_TISSUE_FRACTION = 0.9


def label_alignment_warning(hu_zyx: np.ndarray, label_zyx: np.ndarray, case_id: str) -> str:
    """'' when the labeled voxels look like soft tissue, else a warning naming the case (a cheap check that the
    label really sits on the pancreas after the geometry handling)."""
    inside = hu_zyx[label_zyx > 0]
    if inside.size == 0:
        return f'case {case_id}: the label is empty.'
    fraction = float(np.mean((inside >= SOFT_TISSUE_HU[0]) & (inside <= SOFT_TISSUE_HU[1])))
    if fraction < MIN_SOFT_TISSUE_FRACTION:
        return (f'case {case_id}: only {100 * fraction:.0f} % of the labeled voxels have soft-tissue HU '
                f'({SOFT_TISSUE_HU[0]}..{SOFT_TISSUE_HU[1]}); the label may be misaligned (flipped or shifted). '
                f'Overlay image and label for this case; try the other --label-geometry mode.')
    return ''


def read_dicom_case(case_folder: Path, label_file: Optional[Path], case_id: str, label_geometry: str):
    """(image sitk in HU, label sitk on the image grid or None, note)."""
    import SimpleITK as sitk
    from dataset_conversion.dicom_io import align_label_to_image, read_dicom_series

    image = read_dicom_series(str(case_folder), case_id)
    if label_file is None:
        return image, None, ''
    check_image_integrity(label_file, case_id)
    try:
        label = sitk.ReadImage(str(label_file))
    except RuntimeError as e:
        raise ConversionError(f'case {case_id}: cannot read label {label_file} ({e}). Re-download the NIH '
                              f'labels.') from e
    label, note = align_label_to_image(label, image, case_id, str(label_file), mode=label_geometry)
    return image, label, note


def convert_case(job: dict) -> dict:
    """Convert one case into the writer's temporary folder. job: built by make_jobs."""
    case_id, role, out = job['case_id'], job['role'], Path(job['out'])
    need_label = role != ROLE_UNLABELED
    image_path, label_path = output_paths(out, role, case_id)
    note = warning = ''
    if job['format'] == 'h5':
        image, label = read_h5_case(Path(job['h5']), case_id, need_label)
        check_finite_voxels(image, case_id, job['h5'])
        spacing, origin, direction = (1.0, 1.0, 1.0), None, None
    else:
        import SimpleITK as sitk
        img, lab, note = read_dicom_case(Path(job['dicom']), Path(job['label']) if need_label else None,
                                         case_id, job['label_geometry'])
        image = sitk.GetArrayFromImage(img)
        check_finite_voxels(image, case_id, job['dicom'])  # before the int16 cast turns NaN into garbage
        # HU of CT fit int16; the series reader returns float when RescaleSlope is not 1.
        image = np.round(image).astype(np.int16) if np.issubdtype(image.dtype, np.floating) else image.astype(np.int16)
        label = _binary_label(sitk.GetArrayFromImage(lab), case_id, job['label']) if lab is not None else None
        spacing, origin, direction = img.GetSpacing(), img.GetOrigin(), img.GetDirection()
        if label is not None:
            warning = label_alignment_warning(image, label, case_id)
    write_nifti(image, image_path, spacing, origin, direction)
    if label is not None:
        write_nifti(label, label_path, spacing, origin, direction)
    return {'case_id': case_id, 'shape_zyx': list(image.shape), 'spacing_xyz': [float(s) for s in spacing],
            'note': note, 'warning': warning, 'image_max': float(image.max())}


# ----------------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------------
def get_parser():
    p = build_parser(
        description='Convert Pancreas-CT (TCIA DICOM + NIH labels, or a preprocessed h5 release) into an nnU-Net '
                    'v2 raw dataset with imagesTr/labelsTr (labeled), imagesUnlabeled and imagesTs/labelsTs.',
        default_dataset_id=104, default_name='PancreasCT', split_choices=sorted(SPLITS), default_split='coranet',
        input_help='top folder of the download: TCIA tree with PANCREAS_XXXX folders (NIH labels may be below it '
                   'too), or the folder holding the h5 files')
    p.add_argument('--format', choices=('auto', 'dicom', 'h5'), default='auto',
                   help='input form; auto detects PANCREAS_XXXX DICOM folders or h5 files')
    p.add_argument('--labels-folder', dest='labels_folder', type=Path, default=None,
                   help='folder with the NIH labelXXXX.nii.gz files (DICOM form); default: searched below -i')
    p.add_argument('--label-geometry', dest='label_geometry', choices=('physical', 'voxel'), default='physical',
                   help='DICOM form: "physical" trusts the label header (reorients it to the image, then the grids '
                        'must coincide); "voxel" trusts the array correspondence and copies the image geometry')
    p.add_argument('--h5-channel-name', dest='h5_channel_name', default='noNorm',
                   help='h5 form: dataset.json channel name; noNorm keeps the release\'s normalised intensities, '
                        'zscore makes nnU-Net z-score each image again')
    return accept_underscore_spellings(p)


def _split_lists(args) -> Tuple[List[str], List[str], str, str]:
    train_files, test_file = SPLITS[args.split]
    if args.train_list is not None:
        train = canonical_ids(read_id_list(args.train_list), str(args.train_list))
        train_src = str(args.train_list)
    else:
        train = []
        for f in train_files:
            train += canonical_ids(load_packaged_list(f), f'dataset_conversion/splits/{f}')
        train_src = ' + '.join(f'dataset_conversion/splits/{f}' for f in train_files)
    if args.test_list is not None:
        test = canonical_ids(read_id_list(args.test_list), str(args.test_list))
        test_src = str(args.test_list)
    else:
        test = canonical_ids(load_packaged_list(test_file), f'dataset_conversion/splits/{test_file}')
        test_src = f'dataset_conversion/splits/{test_file}'
    return train, test, train_src, test_src


def duplicate_scan_warnings(train: Sequence[str], test: Sequence[str]) -> List[str]:
    """Warn when a scan and its withdrawn duplicate end up on both sides of the train/test boundary."""
    warnings = []
    train_set, test_set = set(train), set(test)
    for dup, orig in DUPLICATE_SCANS.items():
        for a, b in ((dup, orig), (orig, dup)):
            if a in train_set and b in test_set:
                warnings.append(f'{a} (training) and {b} (test) are the same scan (TCIA withdrew '
                                f'{dup} as a duplicate of {orig}): test leakage. Consider removing {dup} with '
                                f'--train-list/--test-list.')
    return warnings


def make_jobs(assignment, out: Path, fmt: str, sources: Dict[str, Path], labels: Dict[str, Path],
              label_geometry: str) -> List[dict]:
    """One picklable job per case. Unlabeled cases get no label path, so their label cannot leak into the output."""
    jobs = []
    for role, ids in ((ROLE_LABELED, assignment.labeled), (ROLE_UNLABELED, assignment.unlabeled),
                      (ROLE_TEST, assignment.test)):
        for cid in ids:
            job = {'case_id': cid, 'role': role, 'out': str(out), 'format': fmt, 'label_geometry': label_geometry}
            if fmt == 'h5':
                job['h5'] = str(sources[cid])
            else:
                job['dicom'] = str(sources[cid])
                job['label'] = str(labels[cid]) if role != ROLE_UNLABELED else None
            jobs.append(job)
    return jobs


def convert(args) -> Path:
    root = Path(args.input)
    if not root.is_dir():
        raise ConversionError(f'Input folder {root} does not exist: pass -i with the Pancreas-CT download '
                              f'(TCIA folder with PANCREAS_XXXX, or the h5 folder).')
    output_root = resolve_output_root(args.output)
    folder_name = dataset_folder_name(args.dataset_id, args.name)
    # fail before any slow work
    DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,)).check_target()

    fmt = detect_format(root) if args.format == 'auto' else args.format
    labels: Dict[str, Path] = {}
    if fmt == 'h5':
        sources = find_h5_files(root)
    else:
        sources = find_dicom_case_folders(root)
        if args.labels_folder is not None and not Path(args.labels_folder).is_dir():
            raise ConversionError(f'--labels-folder {args.labels_folder} does not exist; pass the folder with the '
                                  f'NIH labelXXXX.nii.gz files.')
        labels = find_label_files(Path(args.labels_folder) if args.labels_folder else root)
    if not sources:
        raise ConversionError(f'No {fmt} cases found below {root}; check -i and --format.')

    train, test, train_src, test_src = _split_lists(args)
    labeled_ids, labeled_src = None, None
    if args.labeled_list is not None:
        labeled_ids = canonical_ids(read_id_list(args.labeled_list), str(args.labeled_list))
        labeled_src = str(args.labeled_list)
    elif args.labeled is None and args.train_list is None and args.split in DEFAULT_LABELED_LIST:
        f = DEFAULT_LABELED_LIST[args.split]
        labeled_ids = canonical_ids(load_packaged_list(f), f'dataset_conversion/splits/{f}')
        labeled_src = f'dataset_conversion/splits/{f}'
    if labeled_ids is not None:
        check_labeled_in_train(labeled_ids, labeled_src, train, train_src, test)
    if labeled_ids is not None and args.only_present:
        labeled_ids = [i for i in labeled_ids if i in sources]  # dropped IDs are recorded by resolve_split
    assignment = resolve_split(train, test, train_source=train_src, test_source=test_src, labeled_n=args.labeled,
                               labeled_ids=labeled_ids, labeled_source=labeled_src, present=sources.keys(),
                               only_present=args.only_present, found_lists_dir=args.write_found_lists)

    # A labeled or test case needs its label; unlabeled cases never have theirs read.
    if fmt == 'dicom':
        for cid in assignment.labeled + assignment.test:
            if cid not in labels:
                where = args.labels_folder or root
                raise ConversionError(f'case {cid} has no label: expected label{cid[-4:]}.nii.gz below {where}. '
                                      f'Add the NIH label file (--labels-folder), or move the case to the '
                                      f'unlabeled part with --labeled-list/--train-list.')
    warnings = duplicate_scan_warnings(assignment.labeled + assignment.unlabeled, assignment.test)
    for w in warnings:
        print(f'WARNING: {w}')

    with DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,),
                       target_spacing=args.target_spacing) as writer:
        jobs = make_jobs(assignment, writer.tmp, fmt, sources, labels, args.label_geometry)
        results = parallel_map(convert_case, jobs, args.num_processes, desc='Pancreas-CT')
        warnings += spacing_outlier_warnings({r['case_id']: r['spacing_xyz'] for r in results}, assignment.labeled)
        notes = {r['case_id']: r['note'] for r in results if r['note']}
        for r in results:
            if r['warning']:
                print(f"WARNING: {r['warning']}")
                warnings.append(r['warning'])
        if notes:
            print(f'{len(notes)} label(s) needed a geometry fix (listed under geometry_fixes in semiseg_split.json), '
                  f'e.g. {next(iter(notes))}: {next(iter(notes.values()))}')
        if fmt == 'h5' and args.h5_channel_name == 'noNorm':
            hu_like = [r['case_id'] for r in results if r['image_max'] > 50]
            if hu_like:
                msg = (f'h5 images of {hu_like[:3]} have values up to {max(r["image_max"] for r in results):.0f}, '
                       f'which looks like raw HU rather than normalised intensities; consider '
                       f'--h5-channel-name CT (nnU-Net CT normalisation).')
                print(f'WARNING: {msg}')
                warnings.append(msg)
        channel = 'CT' if fmt == 'dicom' else args.h5_channel_name
        write_dataset_json(writer.tmp, {0: channel}, {'background': 0, 'pancreas': 1}, len(assignment.labeled),
                           name=folder_name,
                           description='Pancreas-CT (NIH/TCIA), semi-supervised split; see semiseg_split.json',
                           reference='https://doi.org/10.7937/K9/TCIA.2016.tNB1kqBU',
                           numUnlabeled=len(assignment.unlabeled), numTest=len(assignment.test))
        write_split_manifest(
            writer.tmp, dataset='Pancreas-CT', converter='dataset_conversion.pancreas',
            source_format=fmt if fmt == 'dicom' else 'h5 (x, y, z arrays, 1 mm isotropic assumed)',
            input_folder=root, split_name=args.split if args.train_list is None else f'{args.split} (user lists)',
            assignment=assignment, options=vars(args),
            extra={'geometry_fixes': notes, 'warnings': warnings,
                   'channel_name': channel})
    return writer.target


def main(argv=None) -> int:
    return run_main(convert, get_parser(), argv)


if __name__ == '__main__':
    raise SystemExit(main())
