"""ACDC (Automated Cardiac Diagnosis Challenge 2017, cine-MRI: RV, myocardium, LV) -> nnU-Net v2 raw dataset.

Two input forms are accepted (``--format auto`` detects which one ``-i`` holds):

- ``nifti``: the original release: ``<input>/training/patientXXX/`` with ``Info.cfg`` (``ED: 1``, ``ES: 12``),
  ``patientXXX_frameYY.nii.gz`` and ``patientXXX_frameYY_gt.nii.gz`` (``testing/`` and ``database/training/``
  are searched as well). Case IDs keep the real frame numbers (``patient001_frame01``, ``patient001_frame12``);
  the manifest records which one is ED and which ES. True spacing/origin/direction are kept.
- ``h5``: the SSL4MIS processed release: ``<input>/data/patientXXX_frame01.h5`` (= ED) and ``_frame02.h5``
  (= ES), datasets ``image`` (float32, min-max normalised per volume) and ``label`` (uint8 {0..3}), arrays in
  (z, y, x) order, no geometry. ASSUMED spacing: 1 x 1 mm in-plane, 10 mm between slices (``--h5-spacing``),
  the value SSL4MIS itself writes its predictions with; it keeps the strong anisotropy of the real data (in-plane
  ~1.4-1.7 mm, slices 5-10 mm). The literature's metrics are in voxels, so the exact value does not change them.

Normalisation (dataset.json channel name): ``zscore`` for the NIfTI release (nnU-Net's MRI default), ``noNorm``
for the h5 release, whose images are already min-max scaled to [0, 1] per volume (re-normalising would only
change what the literature's networks saw). ``--normalization`` overrides.

Split: SSL4MIS's patient-level 70 / 10 / 20 (train / val / test), identical in SS-Net, BCP and MC-Net. Lists
and ``--labeled N`` count PATIENTS; both frames of a patient always stay together. ``--labeled 3`` and
``--labeled 7`` are the 5 % / 10 % protocols (the 2D methods' 68 / 136 labeled slices are exactly all slices of
those patients). The 10 validation patients serve model selection in SSL4MIS; nnU-Net does not select
checkpoints, so by default they are not written (``--val test`` adds them to imagesTs/labelsTs).
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dataset_conversion import common
from dataset_conversion.common import ConversionError, accept_underscore_spellings

DEFAULT_DATASET_ID = 102
DEFAULT_NAME = "ACDC"
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
H5_SPACING_XYZ = (1.0, 1.0, 10.0)
H5_RELEASE = "the SSL4MIS ACDC h5 release (HiLab-git/SSL4MIS, data/ACDC)"
NIFTI_RELEASE = "the ACDC release (humanheart-project.creatis.insa-lyon.fr)"
SPLITS = {"ssl4mis": ("acdc_train_patients.txt", "acdc_val_patients.txt", "acdc_test_patients.txt")}
PATIENT_RE = re.compile(r"^(patient\d{3})(?:_frame(\d{2}))?$")
H5_FRAME_OF_PHASE = {"ED": 1, "ES": 2}  # SSL4MIS renumbering: frame01 = ED, frame02 = ES

NIFTI_ROOT_CANDIDATES = (".", "training", "testing", "database/training", "database/testing",
                         "ACDC/database/training", "ACDC/database/testing")
H5_ROOT_CANDIDATES = ("data", "ACDC/data", ".")


# ----------------------------------------------------------------------------------------------------------------
# input discovery
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Frame:
    """One 3D volume of a patient (ED or ES) and where it comes from."""
    case_id: str
    patient: str
    phase: str              # "ED" | "ES"
    frame: int | None       # original ACDC frame number (None for h5: the release renumbered them)
    image_file: str
    label_file: str


def parse_info_cfg(path: Path) -> dict[str, str]:
    """Info.cfg: 'Key: value' lines (ED, ES, Group, Height, NbFrame, Weight)."""
    entries = {}
    for line in path.read_text().splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            entries[key.strip()] = value.strip()
    return entries


def _nifti_patient_frames(folder: Path) -> list[Frame]:
    patient = folder.name
    cfg_path = folder / "Info.cfg"
    if not cfg_path.is_file():
        raise ConversionError(f"Patient {patient}: {cfg_path} is missing; it gives the ED/ES frame numbers. "
                              f"Re-download the patient folder from {NIFTI_RELEASE}.")
    cfg = parse_info_cfg(cfg_path)
    frames = []
    for phase in ("ED", "ES"):
        try:
            number = int(cfg[phase])
        except (KeyError, ValueError):
            raise ConversionError(f"Patient {patient}: {cfg_path} has no valid '{phase}: <frame number>' line; "
                                  f"restore the file from the release.") from None
        case_id = f"{patient}_frame{number:02d}"
        frames.append(Frame(case_id, patient, phase, number, str(folder / f"{case_id}.nii.gz"),
                            str(folder / f"{case_id}_gt.nii.gz")))
    if frames[0].case_id == frames[1].case_id:
        raise ConversionError(f"Patient {patient}: {cfg_path} gives the same frame for ED and ES; fix the file.")
    return frames


def find_patients(input_folder: Path, fmt: str) -> tuple[str, dict[str, Path]]:
    """Return (format, {patient: location}) for every patient present below ``input_folder``; the location is the
    patient folder (NIfTI) or the folder holding the h5 files. Frames are resolved later (``patient_frames``) so
    that a broken patient outside the chosen lists does not stop the conversion."""
    if not input_folder.is_dir():
        raise ConversionError(f"Input folder {input_folder} does not exist; pass the downloaded release's top "
                              f"folder with -i (the one containing 'training/' for the NIfTI release or "
                              f"'data/' for the SSL4MIS h5 release).")
    if fmt in ("auto", "nifti"):
        patients: dict[str, Path] = {}
        for name in NIFTI_ROOT_CANDIDATES:
            root = input_folder / name
            if not root.is_dir():
                continue
            for d in sorted(root.iterdir()):
                # a patient folder of the NIfTI release holds Info.cfg or at least one frame file
                if d.is_dir() and PATIENT_RE.match(d.name) and (
                        (d / "Info.cfg").is_file() or any(d.glob(f"{d.name}_frame*.nii.gz"))):
                    first = patients.setdefault(d.name, d)
                    # The same patient in two folders (training/ and testing/, or two unpacked copies): which copy
                    # is meant is unknowable, and taking the first silently could mix test data into training.
                    if first != d and first.resolve() != d.resolve():
                        raise ConversionError(
                            f"Patient {d.name} is present twice: {first} and {d}. Remove or rename one copy (the "
                            f"release has training/patient001..100 and testing/patient101..150), or point -i at "
                            f"the folder that holds the copy you want.")
        if patients:
            return "nifti", patients
    if fmt in ("auto", "h5"):
        for name in H5_ROOT_CANDIDATES:
            root = input_folder / name
            files = sorted(root.glob("patient[0-9][0-9][0-9]_frame0[12].h5")) if root.is_dir() else []
            if files:
                return "h5", {f.name[:len("patient000")]: root for f in files}
    wanted = {"auto": "training/patientXXX/Info.cfg (NIfTI release) or data/patientXXX_frame01.h5 (SSL4MIS h5)",
              "nifti": "training/patientXXX/ with Info.cfg and patientXXX_frameYY[_gt].nii.gz",
              "h5": "data/patientXXX_frame01.h5 and _frame02.h5"}[fmt]
    raise ConversionError(f"No ACDC patients found in {input_folder}: expected {wanted}. Pass the release's top "
                          f"folder with -i.")


def patient_frames(fmt: str, patient: str, location: Path) -> list[Frame]:
    """[ED frame, ES frame] of a patient."""
    if fmt == "nifti":
        return _nifti_patient_frames(location)
    return [Frame(f"{patient}_frame{n:02d}", patient, phase, None, str(location / f"{patient}_frame{n:02d}.h5"),
                  str(location / f"{patient}_frame{n:02d}.h5"))
            for phase, n in H5_FRAME_OF_PHASE.items()]


def to_patient_ids(ids: Sequence[str], source: str) -> list[str]:
    """Accept patient IDs or frame IDs (patientXXX_frameYY); frames are reduced to their patient, so both frames
    of a patient always land in the same subset. Order of first appearance is kept."""
    patients: list[str] = []
    for entry in ids:
        m = PATIENT_RE.match(entry)
        if not m:
            raise ConversionError(f"Unknown case ID {entry!r} in {source}: ACDC IDs look like 'patient001' or "
                                  f"'patient001_frame01'. Fix the list.")
        if m.group(1) not in patients:
            patients.append(m.group(1))
    return patients


# ----------------------------------------------------------------------------------------------------------------
# per-case conversion (module level: runs in worker processes)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseTask:
    frame: Frame
    fmt: str
    role: str
    out_folder: str
    h5_spacing: tuple


def _load_h5(task: CaseTask, need_label: bool):
    fr = task.frame
    keys = ("image", "label") if need_label else ("image",)
    arrays = common.read_h5(fr.image_file, keys, fr.case_id, H5_RELEASE)
    image = arrays["image"].astype(np.float32)
    if image.ndim != 3:
        raise ConversionError(f"Case {fr.case_id}: 'image' in {fr.image_file} has shape {image.shape}, expected a "
                              f"3D (z, y, x) volume. Slice files (data/slices/) are not converted; point -i at the "
                              f"release folder containing data/patientXXX_frame0N.h5.")
    label = None
    if need_label:
        label = arrays["label"]
        common.check_same_geometry(fr.case_id, f"{fr.image_file}['image']", f"{fr.label_file}['label']",
                                   image.shape, label.shape)
        common.check_label_values(fr.case_id, f"{fr.label_file}['label']", label, LABELS.values())
        label = label.astype(np.uint8)
    return image, label, task.h5_spacing, None, None


def _read_nifti(path: str, case_id: str, what: str):
    import SimpleITK as sitk

    if not Path(path).is_file():
        if what == "label":
            raise ConversionError(f"Case {case_id} has no label: {path} is missing. Labeled and test cases need "
                                  f"it; re-download the patient folder or remove the patient from the lists.")
        raise ConversionError(f"Case {case_id}: image {path} is missing (its frame number comes from Info.cfg); "
                              f"re-download the patient folder from {NIFTI_RELEASE}.")
    common.check_image_integrity(path, case_id)
    try:
        return sitk.ReadImage(path)
    except RuntimeError as e:
        raise ConversionError(f"Case {case_id}: cannot read {path} ({str(e).strip().splitlines()[-1]}); the file "
                              f"is corrupt, re-download it.") from None


def _load_nifti(task: CaseTask, need_label: bool):
    import SimpleITK as sitk

    fr = task.frame
    img = _read_nifti(fr.image_file, fr.case_id, "image")
    if img.GetDimension() != 3:
        raise ConversionError(f"Case {fr.case_id}: {fr.image_file} is {img.GetDimension()}D, expected one 3D "
                              f"frame; do not pass the _4d.nii.gz file.")
    image = sitk.GetArrayFromImage(img)
    label = None
    if need_label:
        lab = _read_nifti(fr.label_file, fr.case_id, "label")
        common.check_same_geometry(fr.case_id, fr.image_file, fr.label_file, img.GetSize(), lab.GetSize(),
                                   img.GetSpacing(), lab.GetSpacing())
        label = sitk.GetArrayFromImage(lab)
        common.check_label_values(fr.case_id, fr.label_file, label, LABELS.values())
        label = label.astype(np.uint8)
    return image, label, img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def convert_case(task: CaseTask) -> dict:
    need_label = task.role != common.ROLE_UNLABELED
    loader = _load_h5 if task.fmt == "h5" else _load_nifti
    image, label, spacing, origin, direction = loader(task, need_label)
    common.check_finite_voxels(image, task.frame.case_id, task.frame.image_file)
    image_path, label_path = common.output_paths(task.out_folder, task.role, task.frame.case_id)
    common.write_nifti(image, image_path, spacing, origin, direction)
    if label_path is not None:
        common.write_nifti(label, label_path, spacing, origin, direction)
    fr = task.frame
    return {"case": fr.case_id, "patient": fr.patient, "phase": fr.phase, "frame": fr.frame,
            "ssl4mis_id": f"{fr.patient}_frame{H5_FRAME_OF_PHASE[fr.phase]:02d}", "role": task.role,
            "shape_zyx": list(image.shape), "spacing_xyz": [float(s) for s in spacing]}


# ----------------------------------------------------------------------------------------------------------------
# command
# ----------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = common.build_parser(
        description="Convert ACDC (original NIfTI release or SSL4MIS h5 release) into an nnU-Net v2 raw dataset "
                    "with labeled, unlabeled and test cases. Lists and --labeled count PATIENTS (both frames "
                    "of a patient stay together); list files may hold patient or frame IDs.",
        default_dataset_id=DEFAULT_DATASET_ID, default_name=DEFAULT_NAME, split_choices=sorted(SPLITS),
        default_split="ssl4mis",
        input_help="top folder of the download: the one containing 'training/' (NIfTI release) or 'data/' "
                   "(SSL4MIS h5 release)")
    p.add_argument("--format", choices=("auto", "nifti", "h5"), default="auto", help="input form")
    p.add_argument("--val", choices=("skip", "test"), default="skip",
                   help="what to do with the split's validation patients: not written, or added to "
                        "imagesTs/labelsTs (recorded in the manifest either way)")
    p.add_argument("--val-list", dest="val_list", type=Path, default=None, metavar="FILE",
                   help="replace the split's validation list (when --train-list or --test-list is given, the "
                        "published validation list is ignored unless this is passed)")
    p.add_argument("--h5-spacing", dest="h5_spacing", type=float, nargs=3, default=H5_SPACING_XYZ,
                   metavar=("X", "Y", "Z"), help="spacing (mm) written for h5 input, which stores none")
    p.add_argument("--normalization", choices=("auto", "zscore", "noNorm", "rescale_to_0_1"), default="auto",
                   help="dataset.json channel name (nnU-Net normalisation); auto = zscore for NIfTI, noNorm for h5")
    return accept_underscore_spellings(p)


def _read_patient_list(path: Path | None, packaged: str | None) -> tuple[list[str] | None, str | None]:
    """A user list (patient or frame IDs, reduced to patients) wins over the packaged list; neither -> (None, None)."""
    if path is not None:
        return to_patient_ids(common.read_id_list(path), str(path)), str(path)
    if packaged is not None:
        return common.load_packaged_list(packaged), f"splits/{packaged}"
    return None, None


def convert(args: argparse.Namespace) -> Path:
    output_root = common.resolve_output_root(args.output)
    folder_name = common.dataset_folder_name(args.dataset_id, args.name)
    writer = common.DatasetWriter(output_root, folder_name, args.overwrite, inputs=(args.input,),
                                  target_spacing=args.target_spacing)
    writer.check_target()
    fmt, patients = find_patients(Path(args.input), args.format)

    train_file, val_file, test_file = SPLITS[args.split]
    custom = args.train_list is not None or args.test_list is not None
    train_ids, train_source = _read_patient_list(args.train_list, train_file)
    test_ids, test_source = _read_patient_list(args.test_list, test_file)
    # A user-defined split would overlap the published validation patients: ignore those unless asked.
    val_ids, val_source = _read_patient_list(args.val_list, None if custom else val_file)
    val_ids = val_ids or []
    labeled_ids = (to_patient_ids(common.read_id_list(args.labeled_list), str(args.labeled_list))
                   if args.labeled_list is not None else None)
    assignment = common.resolve_split(
        train_ids, test_ids, train_source=train_source, test_source=test_source, labeled_n=args.labeled,
        labeled_ids=labeled_ids, labeled_source=str(args.labeled_list), present=patients,
        only_present=args.only_present, unit="patient", found_lists_dir=args.write_found_lists,
        location_hint=(f"{next(iter(patients.values())).parent}/patientXXX/ with Info.cfg" if fmt == "nifti"
                       else f"{next(iter(patients.values()))}/patientXXX_frame01.h5 and _frame02.h5"))

    for p in val_ids:
        if p in assignment.labeled or p in assignment.unlabeled or p in assignment.test:
            raise ConversionError(f"Patient {p} is in the validation list ({val_source}) and in the training or "
                                  f"test list; pass a --val-list without it.")
    val_missing = [p for p in val_ids if p not in patients]
    if args.val == "test" and val_missing:
        if not args.only_present:
            raise ConversionError(f"Validation patient {val_missing[0]} ({val_source}) is missing from the input; "
                                  f"use --val skip, --only-present, or a --val-list of patients you have.")
        assignment.provenance["dropped_missing_from_input"] += val_missing
    val_present = [p for p in val_ids if p in patients]
    test_patients = assignment.test + (val_present if args.val == "test" else [])

    roles = ((common.ROLE_LABELED, assignment.labeled), (common.ROLE_UNLABELED, assignment.unlabeled),
             (common.ROLE_TEST, test_patients))
    normalization = args.normalization if args.normalization != "auto" else ("noNorm" if fmt == "h5" else "zscore")

    with writer:
        tasks = [CaseTask(frame, fmt, role, str(writer.tmp), tuple(args.h5_spacing))
                 for role, pats in roles for p in pats for frame in patient_frames(fmt, p, patients[p])]
        infos = common.parallel_map(convert_case, tasks, args.num_processes, desc=f"ACDC ({fmt})")
        cases_of = {role: [t.frame.case_id for t in tasks if t.role == role] for role, _ in roles}
        common.spacing_outlier_warnings({i["case"]: i["spacing_xyz"] for i in infos}, cases_of[common.ROLE_LABELED])
        common.write_dataset_json(
            writer.tmp, channel_names={0: normalization}, labels=LABELS,
            num_training=len(cases_of[common.ROLE_LABELED]),
            name=args.name, description="ACDC 2017 cine-MRI: right-ventricle cavity, myocardium, left-ventricle "
                                        "cavity (ED and ES frames)",
            numUnlabeled=len(cases_of[common.ROLE_UNLABELED]), numTest=len(cases_of[common.ROLE_TEST]),
            source_format=fmt, reference="Bernard et al., IEEE TMI 2018, doi 10.1109/TMI.2018.2837502")
        case_assignment = common.SplitAssignment(
            cases_of[common.ROLE_LABELED], cases_of[common.ROLE_UNLABELED], cases_of[common.ROLE_TEST],
            {**assignment.provenance, "val_list": val_source})
        common.write_split_manifest(
            writer.tmp, dataset=folder_name, converter="dataset_conversion.acdc", source_format=fmt,
            input_folder=args.input,
            split_name=(args.split if not custom else f"custom lists (published split {args.split} replaced)"),
            assignment=case_assignment, options=vars(args),
            extra={"unit": "patient",
                   "labeled_patients": assignment.labeled, "unlabeled_patients": assignment.unlabeled,
                   "test_patients": test_patients, "val_patients": val_ids,
                   "val_handling": ("written to imagesTs/labelsTs" if args.val == "test" else "not written"),
                   "spacing_note": (f"h5 stores no geometry; ASSUMED spacing (x, y, z) = {tuple(args.h5_spacing)} "
                                    f"mm, origin 0, identity direction" if fmt == "h5" else
                                    "geometry copied from the NIfTI headers"),
                   "cases": {i["case"]: {k: i[k] for k in ("patient", "phase", "frame", "ssl4mis_id",
                                                           "shape_zyx", "spacing_xyz")} for i in infos}})
    return writer.target


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
