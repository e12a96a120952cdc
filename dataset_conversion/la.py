"""LA (2018 Atrial Segmentation Challenge, LGE-MRI, left-atrium cavity) -> nnU-Net v2 raw dataset.

Two input forms are accepted (``--format auto`` detects which one a case folder holds):

- ``h5``: the UA-MT release used by UA-MT/SASSNet/DTC/MC-Net/SS-Net/BCP/MCF:
  ``<input>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5`` with datasets ``image`` (float32, z-scored over the
  uncropped volume, then cropped) and ``label`` (uint8 {0,1}), arrays in (x, y, z) order, no geometry stored.
  Written with the challenge's spacing, 0.625 mm isotropic (``--h5-spacing``), origin 0, identity direction.
- ``nrrd``: the challenge release: ``<input>/Training Set/<ID>/lgemri.nrrd`` + ``laendo.nrrd`` (255 = atrium).
  Geometry is taken from the NRRD headers; the label becomes {0, 1}.

Normalisation: channel name ``zscore`` by default for both forms. For the raw release that is nnU-Net's standard
MRI scheme. For the h5 release the image was z-scored over the whole *uncropped* volume before the random crop, so
the cropped volumes have mean 0.05-1.94 and std 0.31-1.66; a second per-case z-score is close to a no-op for
typical cases, removes that crop-dependent shift, and makes models trained on the h5 and the raw release see the
same kind of input. ``--normalization noNorm`` keeps the h5 values exactly as the literature's networks saw them.

Splits: ``uamt`` (80/20, UA-MT ``train.list``/``test.list``, identical in SS-Net, BCP, MC-Net, SASSNet, MCF fold 0)
and ``mcf_fold0..4`` (MCF's 5 contiguous folds). Labeled = first N of the training list (``--labeled 4/8/16``).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dataset_conversion import common
from dataset_conversion.common import ConversionError, accept_underscore_spellings

DEFAULT_DATASET_ID = 101
DEFAULT_NAME = "LA"
H5_FILE = "mri_norm2.h5"
RAW_IMAGE_FILE, RAW_LABEL_FILE = "lgemri.nrrd", "laendo.nrrd"
RAW_FOREGROUND = 255
H5_SPACING_MM = 0.625  # challenge specification; the h5 files store no geometry
H5_RELEASE = "the UA-MT h5 release (github.com/yulequan/UA-MT, data/2018LA_Seg_Training Set)"
RAW_RELEASE = "the 2018 Atrial Segmentation Challenge release (cardiacatlas.org)"
LABELS = {"background": 0, "left_atrium": 1}

# split name -> (training list, test list) in dataset_conversion/splits/
SPLITS = {"uamt": ("la_train.txt", "la_test.txt"),
          **{f"mcf_fold{k}": (f"la_mcf_fold{k}_train.txt", f"la_mcf_fold{k}_test.txt") for k in range(5)}}

# Where the case folders may sit below -i (the h5 repo's data/ folder, the challenge zip's top folder, or the
# case-folder parent itself).
CASE_ROOT_CANDIDATES = ("2018LA_Seg_Training Set", "data/2018LA_Seg_Training Set", "Training Set", "Training_Set",
                        "training", ".")
FORMAT_MARKER = {"h5": H5_FILE, "nrrd": RAW_IMAGE_FILE}


def find_cases(input_folder: Path, fmt: str) -> tuple[str, dict[str, Path]]:
    """Locate the case folders below ``input_folder``; return (format, {case ID: case folder})."""
    if not input_folder.is_dir():
        raise ConversionError(f"Input folder {input_folder} does not exist; pass the downloaded release's top "
                              f"folder with -i (the folder that contains '2018LA_Seg_Training Set/' or "
                              f"'Training Set/').")
    formats = ("h5", "nrrd") if fmt == "auto" else (fmt,)
    for name in CASE_ROOT_CANDIDATES:
        root = (input_folder / name).resolve() if name != "." else input_folder.resolve()
        if not root.is_dir():
            continue
        for f in formats:
            cases = {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and (d / FORMAT_MARKER[f]).is_file()}
            if cases:
                return f, cases
    wanted = " or ".join(f"<ID>/{FORMAT_MARKER[f]}" for f in formats)
    raise ConversionError(f"No LA cases found in {input_folder}: expected case folders {wanted} in "
                          f"{input_folder} or in its subfolder '2018LA_Seg_Training Set' (h5) / 'Training Set' "
                          f"(challenge NRRD). Pass the release's top folder with -i.")


@dataclass(frozen=True)
class CaseTask:
    case_id: str
    case_folder: str
    fmt: str
    role: str
    out_folder: str
    h5_spacing: float


def _load_h5(task: CaseTask, need_label: bool):
    keys = ("image", "label") if need_label else ("image",)
    path = Path(task.case_folder) / H5_FILE
    arrays = common.read_h5(path, keys, task.case_id, H5_RELEASE)
    image = arrays["image"]
    if image.ndim != 3:
        raise ConversionError(f"Case {task.case_id}: 'image' in {path} has shape {image.shape}, expected a 3D "
                              f"(x, y, z) volume; re-download the file.")
    # h5 arrays are (x, y, z) (pynrrd order); SimpleITK wants (z, y, x).
    image = image.astype(np.float32).transpose(2, 1, 0)
    spacing = (task.h5_spacing,) * 3
    label = None
    if need_label:
        label = arrays["label"]
        common.check_same_geometry(task.case_id, f"{path}['image']", f"{path}['label']",
                                   image.shape[::-1], label.shape)
        label = label.transpose(2, 1, 0)
        common.check_label_values(task.case_id, f"{path}['label']", label, (0, 1))
        label = label.astype(np.uint8)
    return image, label, spacing, None, None


def _load_nrrd(task: CaseTask, need_label: bool):
    import SimpleITK as sitk

    image_path = Path(task.case_folder) / RAW_IMAGE_FILE
    label_path = Path(task.case_folder) / RAW_LABEL_FILE
    common.check_image_integrity(image_path, task.case_id)
    try:
        img = sitk.ReadImage(str(image_path))
    except RuntimeError as e:
        raise ConversionError(f"Case {task.case_id}: cannot read {image_path} ({str(e).strip().splitlines()[-1]}); "
                              f"re-download it from {RAW_RELEASE}.") from None
    if img.GetDimension() != 3:
        raise ConversionError(f"Case {task.case_id}: {image_path} is a {img.GetDimension()}D image, expected a 3D "
                              f"LGE-MRI volume; re-download it from {RAW_RELEASE} or exclude the case from the lists.")
    image = sitk.GetArrayFromImage(img).astype(np.float32)
    label = None
    if need_label:
        if not label_path.is_file():
            raise ConversionError(f"Case {task.case_id} has no label: {label_path} is missing. Labeled and test "
                                  f"cases need it; re-download the case or remove it from the lists.")
        common.check_image_integrity(label_path, task.case_id)
        try:
            lab = sitk.ReadImage(str(label_path))
        except RuntimeError as e:
            raise ConversionError(f"Case {task.case_id}: cannot read {label_path} "
                                  f"({str(e).strip().splitlines()[-1]}); re-download it.") from None
        common.check_same_geometry(task.case_id, image_path, label_path, img.GetSize(), lab.GetSize(),
                                   img.GetSpacing(), lab.GetSpacing())
        raw = sitk.GetArrayFromImage(lab)
        common.check_label_values(task.case_id, label_path, raw, (0, RAW_FOREGROUND))
        label = (raw == RAW_FOREGROUND).astype(np.uint8)
    return image, label, img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def convert_case(task: CaseTask) -> dict:
    """Convert one case into its role's folders. Module-level so that worker processes can run it."""
    need_label = task.role != common.ROLE_UNLABELED
    loader = _load_h5 if task.fmt == "h5" else _load_nrrd
    image, label, spacing, origin, direction = loader(task, need_label)
    common.check_finite_voxels(image, task.case_id,
                               Path(task.case_folder) / (H5_FILE if task.fmt == "h5" else RAW_IMAGE_FILE))
    image_path, label_path = common.output_paths(task.out_folder, task.role, task.case_id)
    common.write_nifti(image, image_path, spacing, origin, direction)
    if label_path is not None:
        common.write_nifti(label, label_path, spacing, origin, direction)
    return {"case": task.case_id, "role": task.role, "shape_zyx": list(image.shape),
            "spacing_xyz": [float(s) for s in spacing]}


def build_parser() -> argparse.ArgumentParser:
    p = common.build_parser(
        description="Convert the LA (2018 Atrial Segmentation Challenge) data into an nnU-Net v2 raw dataset with "
                    "labeled (imagesTr/labelsTr), unlabeled (imagesUnlabeled) and test (imagesTs/labelsTs) cases.",
        default_dataset_id=DEFAULT_DATASET_ID, default_name=DEFAULT_NAME, split_choices=sorted(SPLITS),
        default_split="uamt",
        input_help="top folder of the download: UA-MT's data/ folder (containing '2018LA_Seg_Training Set/') or "
                   "the challenge's folder containing 'Training Set/'")
    p.add_argument("--format", choices=("auto", "h5", "nrrd"), default="auto",
                   help="input form: UA-MT h5 release or challenge NRRD release")
    p.add_argument("--h5-spacing", dest="h5_spacing", type=float, default=H5_SPACING_MM, metavar="MM",
                   help="isotropic spacing written for h5 input (the h5 files store none)")
    p.add_argument("--normalization", choices=("zscore", "noNorm"), default="zscore",
                   help="dataset.json channel name, i.e. nnU-Net's intensity normalisation (see module doc)")
    return accept_underscore_spellings(p)


def convert(args: argparse.Namespace) -> Path:
    output_root = common.resolve_output_root(args.output)
    folder_name = common.dataset_folder_name(args.dataset_id, args.name)
    writer = common.DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,),
                                  target_spacing=args.target_spacing)
    writer.check_target()  # fail before reading anything
    fmt, cases = find_cases(Path(args.input), args.format)

    train_file, test_file = SPLITS[args.split]
    if args.train_list is not None:
        train_ids, train_source = common.read_id_list(args.train_list), str(args.train_list)
    else:
        train_ids, train_source = common.load_packaged_list(train_file), f"splits/{train_file}"
    if args.test_list is not None:
        test_ids, test_source = common.read_id_list(args.test_list), str(args.test_list)
    else:
        test_ids, test_source = common.load_packaged_list(test_file), f"splits/{test_file}"
    labeled_ids = common.read_id_list(args.labeled_list) if args.labeled_list is not None else None
    assignment = common.resolve_split(
        train_ids, test_ids, train_source=train_source, test_source=test_source, labeled_n=args.labeled,
        labeled_ids=labeled_ids, labeled_source=str(args.labeled_list), present=cases,
        only_present=args.only_present,
        location_hint=str(next(iter(cases.values())).parent / "<ID>" / FORMAT_MARKER[fmt]),
        found_lists_dir=args.write_found_lists)

    with writer:
        tasks = [CaseTask(cid, str(cases[cid]), fmt, role, str(writer.tmp), args.h5_spacing)
                 for role, ids in ((common.ROLE_LABELED, assignment.labeled),
                                   (common.ROLE_UNLABELED, assignment.unlabeled),
                                   (common.ROLE_TEST, assignment.test))
                 for cid in ids]
        infos = common.parallel_map(convert_case, tasks, args.num_processes, desc=f"LA ({fmt})")
        common.spacing_outlier_warnings({i["case"]: i["spacing_xyz"] for i in infos}, assignment.labeled)
        common.write_dataset_json(
            writer.tmp, channel_names={0: args.normalization}, labels=LABELS,
            num_training=len(assignment.labeled),
            name=args.name, description="LA 2018 Atrial Segmentation Challenge (LGE-MRI), left-atrium cavity",
            numUnlabeled=len(assignment.unlabeled), numTest=len(assignment.test),
            source_format=fmt, reference="Xiong et al., MedIA 2021; split: " + args.split)
        common.write_split_manifest(
            writer.tmp, dataset=folder_name, converter="dataset_conversion.la", source_format=fmt,
            input_folder=args.input, split_name=(args.split if args.train_list is None and args.test_list is None
                        else f"custom lists (published split {args.split} replaced in part)"),
            assignment=assignment, options=vars(args),
            extra={"spacing_note": (f"h5 stores no geometry; written with {args.h5_spacing} mm isotropic spacing, "
                                    f"origin 0, identity direction" if fmt == "h5" else
                                    "geometry copied from the NRRD headers"),
                   "cases": {i["case"]: {"shape_zyx": i["shape_zyx"], "spacing_xyz": i["spacing_xyz"]}
                             for i in infos}})
    return writer.target


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
