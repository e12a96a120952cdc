"""ACDC converter: synthetic NIfTI release (Info.cfg, real frame numbers, true geometry) and SSL4MIS h5 release,
patient-level splits, every promised error, and the real SSL4MIS h5 subset."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import acdc, common
from nnunetv2_semiseg.utilities.real_data import real_data_folder

REAL_ACDC = Path(real_data_folder("ACDC"))
TRAIN_P = common.load_packaged_list("acdc_train_patients.txt")
VAL_P = common.load_packaged_list("acdc_val_patients.txt")
TEST_P = common.load_packaged_list("acdc_test_patients.txt")
SHAPE_ZYX = (4, 12, 10)
SPACING = (1.5625, 1.5625, 10.0)
ORIGIN = (-100.0, 50.0, 3.0)


def _volume(seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 400, size=SHAPE_ZYX).astype(np.int16)
    label = np.zeros(SHAPE_ZYX, np.uint8)
    label[1:3, 2:5, 2:5], label[1:3, 6:9, 2:5], label[1:3, 6:9, 6:9] = 1, 2, 3
    return image, label


def _nifti(array, path, spacing=SPACING, origin=ORIGIN):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def make_nifti_release(root: Path, patients, es_frame=7, skip=(), gt_spacing=SPACING, gt_shape=SHAPE_ZYX):
    """Original layout: <root>/training/patientXXX/{Info.cfg, patientXXX_frameYY[_gt].nii.gz}.
    skip: file names (e.g. 'patient001_frame07_gt.nii.gz', 'Info.cfg') not to write."""
    for k, p in enumerate(patients):
        d = root / "training" / p
        d.mkdir(parents=True)
        if "Info.cfg" not in skip:
            (d / "Info.cfg").write_text(f"ED: 1\nES: {es_frame}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\n"
                                        f"Weight: 80.0\n")
        for frame in (1, es_frame):
            image, label = _volume(10 * k + frame)
            name = f"{p}_frame{frame:02d}"
            if f"{name}.nii.gz" not in skip:
                _nifti(image, d / f"{name}.nii.gz")
            if f"{name}_gt.nii.gz" not in skip:
                gt = np.zeros(gt_shape, np.uint8)
                gt[tuple(slice(0, min(a, b)) for a, b in zip(gt_shape, SHAPE_ZYX))] = label[
                    tuple(slice(0, min(a, b)) for a, b in zip(gt_shape, SHAPE_ZYX))]
                _nifti(gt, d / f"{name}_gt.nii.gz", spacing=gt_spacing)
    return root


def make_h5_release(root: Path, patients, overrides=None):
    """SSL4MIS layout: <root>/data/patientXXX_frame0{1,2}.h5, arrays (z, y, x), image in [0, 1]."""
    d = root / "data"
    d.mkdir(parents=True)
    for k, p in enumerate(patients):
        for n in (1, 2):
            image, label = _volume(10 * k + n)
            name = f"{p}_frame{n:02d}"
            datasets = (overrides or {}).get(name, {"image": image.astype(np.float32) / 400, "label": label})
            with h5py.File(d / f"{name}.h5", "w") as f:
                for key, value in datasets.items():
                    f.create_dataset(key, data=value, compression="gzip")
    return root


def write_list(path: Path, ids):
    path.write_text("".join(i + "\n" for i in ids))
    return path


def run(tmp_path, *args):
    return acdc.main(["--output", str(tmp_path / "raw"), *map(str, args)])


def files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def frames(patients, numbers=(1, 2)):
    return [f"{p}_frame{n:02d}" for p in patients for n in numbers]


def assert_unlabeled_have_no_label(out: Path, unlabeled_cases):
    names = {p.name for p in out.rglob("*")}
    assert files(out / "imagesUnlabeled") == sorted(f"{c}_0000.nii.gz" for c in unlabeled_cases)
    for c in unlabeled_cases:
        assert f"{c}.nii.gz" not in names


def test_nifti_release_real_frame_numbers_geometry_and_phases(tmp_path):
    pats = ["patient001", "patient002", "patient003", "patient004"]
    src = make_nifti_release(tmp_path / "src", pats, es_frame=7)
    tr = write_list(tmp_path / "tr.txt", pats[:3])
    te = write_list(tmp_path / "te.txt", ["patient004_frame01"])  # a frame ID selects the whole patient
    assert run(tmp_path, "-i", src, "-d", 27, "--train-list", tr, "--test-list", te, "--labeled", 1) == 0
    out = tmp_path / "raw" / "Dataset027_ACDC"
    assert files(tmp_path / "raw") == ["Dataset027_ACDC"]
    assert files(out / "imagesTr") == ["patient001_frame01_0000.nii.gz", "patient001_frame07_0000.nii.gz"]
    assert files(out / "labelsTr") == ["patient001_frame01.nii.gz", "patient001_frame07.nii.gz"]
    assert files(out / "labelsTs") == ["patient004_frame01.nii.gz", "patient004_frame07.nii.gz"]
    assert_unlabeled_have_no_label(out, frames(pats[1:3], (1, 7)))

    img = sitk.ReadImage(str(out / "imagesTr" / "patient001_frame07_0000.nii.gz"))
    lab = sitk.ReadImage(str(out / "labelsTr" / "patient001_frame07.nii.gz"))
    for im in (img, lab):
        assert im.GetSpacing() == pytest.approx(SPACING) and im.GetOrigin() == pytest.approx(ORIGIN)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), _volume(7)[0])
    assert sorted(np.unique(sitk.GetArrayFromImage(lab)).tolist()) == [0, 1, 2, 3]

    ds = json.loads((out / "dataset.json").read_text())
    assert ds["labels"] == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert ds["numTraining"] == 2 and ds["channel_names"] == {"0": "zscore"}
    man = json.loads((out / "semiseg_split.json").read_text())
    assert man["labeled_patients"] == ["patient001"] and man["test_patients"] == ["patient004"]
    assert man["unlabeled"] == frames(pats[1:3], (1, 7))
    assert man["cases"]["patient002_frame07"] == {
        "patient": "patient002", "phase": "ES", "frame": 7, "ssl4mis_id": "patient002_frame02",
        "shape_zyx": list(SHAPE_ZYX), "spacing_xyz": list(SPACING)}
    assert man["cases"]["patient002_frame01"]["phase"] == "ED"
    assert man["source_format"] == "nifti"


def test_h5_published_ssl4mis_protocol(tmp_path):
    """All 100 training patients (tiny): --labeled 3 = patient099, 038, 050; 67 unlabeled; 20 test; val skipped,
    then --val test adds the 10 validation patients to the test set."""
    src = make_h5_release(tmp_path / "src", TRAIN_P + VAL_P + TEST_P)
    assert run(tmp_path, "-i", src, "--labeled", 3, "-np", 2) == 0
    out = tmp_path / "raw" / "Dataset102_ACDC"
    man = json.loads((out / "semiseg_split.json").read_text())
    assert man["labeled_patients"] == ["patient099", "patient038", "patient050"]
    assert man["labeled"] == frames(["patient099", "patient038", "patient050"])
    assert man["unlabeled_patients"] == TRAIN_P[3:] and man["test_patients"] == TEST_P
    assert man["val_patients"] == VAL_P and man["val_handling"] == "not written"
    assert (man["split"], man["train_list"]) == ("ssl4mis", "splits/acdc_train_patients.txt")
    # the frame-level SSL4MIS lists agree with the patient-level assignment
    assert man["labeled"] + man["unlabeled"] == common.load_packaged_list("acdc_train.txt")
    assert man["test"] == common.load_packaged_list("acdc_test.txt")
    assert len(files(out / "labelsTr")) == 6 and len(files(out / "labelsTs")) == 40
    assert_unlabeled_have_no_label(out, frames(TRAIN_P[3:]))
    assert not any(n.startswith(tuple(VAL_P)) for n in files(out / "imagesTs"))
    img = sitk.ReadImage(str(out / "imagesTr" / "patient099_frame02_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((1.0, 1.0, 10.0)) and img.GetSize() == SHAPE_ZYX[::-1]
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 6 and ds["channel_names"] == {"0": "noNorm"}
    assert "ASSUMED spacing" in man["spacing_note"]

    assert run(tmp_path, "-i", src, "-d", 103, "--labeled", 7, "--val", "test") == 0
    man = json.loads((tmp_path / "raw" / "Dataset103_ACDC" / "semiseg_split.json").read_text())
    assert man["labeled_patients"] == common.load_packaged_list("acdc_train_labeled_first7_patients.txt")
    assert man["test_patients"] == TEST_P + VAL_P and len(man["test"]) == 60


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------
PATS = ["patient001", "patient002", "patient003"]


def _lists(tmp_path, labeled=1):
    return ["--train-list", write_list(tmp_path / "tr.txt", PATS[:2]),
            "--test-list", write_list(tmp_path / "te.txt", PATS[2:]), "--labeled", labeled]


def expect_error(tmp_path, capsys, args, pattern):
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert pattern in err, err
    raw = tmp_path / "raw"
    assert not raw.exists() or [p.name for p in raw.iterdir()] == []  # nothing half-written
    return err


def test_missing_input_folder_and_empty_input(tmp_path, capsys):
    expect_error(tmp_path, capsys, ["-i", tmp_path / "nowhere"], "nowhere does not exist; pass the downloaded")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, capsys, ["-i", tmp_path / "empty"], "No ACDC patients found in")


def test_missing_info_cfg(tmp_path, capsys):
    src = make_nifti_release(tmp_path / "src", PATS, skip=("Info.cfg",))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Patient patient001: {src / 'training' / 'patient001' / 'Info.cfg'} is missing")


def test_labeled_case_without_label(tmp_path, capsys):
    src = make_nifti_release(tmp_path / "src", PATS, skip=("patient003_frame07_gt.nii.gz",))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Case patient003_frame07 has no label: "
                 f"{src / 'training' / 'patient003' / 'patient003_frame07_gt.nii.gz'} is missing")


def test_unlabeled_case_needs_no_label(tmp_path):
    src = make_nifti_release(tmp_path / "src", PATS, skip=("patient002_frame07_gt.nii.gz",))
    assert run(tmp_path, "-i", src, *_lists(tmp_path)) == 0
    assert_unlabeled_have_no_label(tmp_path / "raw" / "Dataset102_ACDC", frames(["patient002"], (1, 7)))


def test_missing_frame_image(tmp_path, capsys):
    src = make_nifti_release(tmp_path / "src", PATS, skip=("patient002_frame01.nii.gz",))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 "Case patient002_frame01: image ")


def test_spacing_mismatch(tmp_path, capsys):
    src = make_nifti_release(tmp_path / "b", PATS, gt_spacing=(1.5625, 1.5625, 5.0))
    err = expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                       "has spacing (1.5625, 1.5625, 10.0) but label")
    assert "patient001_frame01_gt.nii.gz has spacing (1.5625, 1.5625, 5.0)" in err


def test_shape_mismatch_message(tmp_path, capsys):
    src = make_nifti_release(tmp_path / "a", PATS, gt_shape=(4, 12, 9))
    err = expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)], "has shape (10, 12, 4) but label")
    assert "patient001_frame01_gt.nii.gz has shape (9, 12, 4)" in err


def test_wrong_h5_keys_and_label_values(tmp_path, capsys):
    image, label = _volume(0)
    src = make_h5_release(tmp_path / "a", PATS, {"patient003_frame02": {"data": image, "label": label}})
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Case patient003_frame02: {src / 'data' / 'patient003_frame02.h5'} has keys ['data', 'label'], "
                 f"expected ['image', 'label']")
    src = make_h5_release(tmp_path / "b", PATS, {"patient001_frame01": {"image": image, "label": label * 2}})
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)], "contains values [4, 6], expected only")


def test_h5_patient_missing_one_frame(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", PATS)
    (src / "data" / "patient002_frame02.h5").unlink()
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Case patient002_frame02: file {src / 'data' / 'patient002_frame02.h5'} is missing")


def test_unknown_ids_in_lists(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", PATS)
    bad = write_list(tmp_path / "bad.txt", ["patient001", "pat_7"])
    expect_error(tmp_path, capsys, ["-i", src, "--train-list", bad], f"Unknown case ID 'pat_7' in {bad}")
    lab = write_list(tmp_path / "lab.txt", ["patient003"])
    expect_error(tmp_path, capsys, ["-i", src, "--train-list", write_list(tmp_path / "tr.txt", PATS[:2]),
                                    "--test-list", write_list(tmp_path / "te.txt", PATS[2:]), "--labeled-list", lab],
                 f"Unknown patient ID 'patient003' in the labeled list {lab}: it is not in the training list")
    err = expect_error(tmp_path, capsys, ["-i", src, "--train-list", write_list(tmp_path / "t2.txt", ["patient009"]),
                                          "--test-list", write_list(tmp_path / "empty.txt", [])],
                       "1 patient(s) of the split lists are missing from the input (patient009;")
    assert f"expected {src / 'data'}/patientXXX_frame01.h5 and _frame02.h5. Fix:" in err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", PATS)
    assert run(tmp_path, "-i", src, *_lists(tmp_path)) == 0
    out = tmp_path / "raw" / "Dataset102_ACDC"
    assert run(tmp_path, "-i", src, *_lists(tmp_path)) == 2
    assert f"Output dataset {out} already exists; pass --overwrite" in capsys.readouterr().err
    assert run(tmp_path, "-i", src, *_lists(tmp_path, labeled=2), "--overwrite") == 0
    assert len(files(out / "labelsTr")) == 4 and files(out / "imagesUnlabeled") == []


# ------------------------------------------------------------------------------------------------------------------
# real data: SSL4MIS h5 subset (validation + test volumes only, so the lists are cut to the patients present)
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not REAL_ACDC.is_dir(), reason="real ACDC subset not available (set nnUNet_semiseg_ACDC_h5)")
def test_real_acdc_subset(tmp_path):
    train, test = VAL_P[:3], TEST_P[:2]  # all present in the subset
    tr, te = write_list(tmp_path / "tr.txt", train), write_list(tmp_path / "te.txt", test)
    assert run(tmp_path, "-i", REAL_ACDC, "-d", 932, "--train-list", tr, "--test-list", te, "--labeled", 1) == 0
    out = tmp_path / "raw" / "Dataset932_ACDC"
    assert files(out / "labelsTr") == [f"{c}.nii.gz" for c in frames(train[:1])]
    assert files(out / "labelsTs") == sorted(f"{c}.nii.gz" for c in frames(test))
    assert_unlabeled_have_no_label(out, frames(train[1:]))
    for role, folder, cases in (("labeled", "labelsTr", frames(train[:1])), ("test", "labelsTs", frames(test))):
        for c in cases:
            with h5py.File(REAL_ACDC / "data" / f"{c}.h5") as f:
                label = f["label"][()]
            lab = sitk.ReadImage(str(out / folder / f"{c}.nii.gz"))
            assert lab.GetSpacing() == pytest.approx((1.0, 1.0, 10.0))
            np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), label)  # (z, y, x) kept, no flip
            assert set(np.unique(sitk.GetArrayFromImage(lab)).tolist()) <= {0, 1, 2, 3}
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "imagesUnlabeled" / f"{train[1]}_frame01_0000.nii.gz")))
    assert img.dtype == np.float32 and img.min() >= 0.0 and img.max() == pytest.approx(1.0)
    man = json.loads((out / "semiseg_split.json").read_text())
    assert man["val_patients"] == [] and man["labeled_patients"] == train[:1]
    assert man["cases"][f"{train[0]}_frame02"]["phase"] == "ES"
