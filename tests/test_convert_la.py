"""LA converter: synthetic UA-MT h5 and challenge NRRD releases, every promised error, and the real h5 subset
run through stock nnU-Net planning/preprocessing and our unlabeled preprocessing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import common, la
from nnunetv2_semiseg.utilities.real_data import real_data_folder

REAL_LA = Path(real_data_folder("LA"))
UAMT_TRAIN = common.load_packaged_list("la_train.txt")
UAMT_TEST = common.load_packaged_list("la_test.txt")
SHAPE_XYZ = (16, 12, 8)


def _volume(seed, shape_xyz=SHAPE_XYZ):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape_xyz).astype(np.float32)
    label = np.zeros(shape_xyz, np.uint8)
    label[4:10, 3:8, 2:6] = 1
    return image, label


def make_h5_release(root: Path, ids, **overrides):
    """UA-MT layout: <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5, arrays (x, y, z).
    overrides: {ID: dict of datasets to write instead}."""
    for k, cid in enumerate(ids):
        d = root / "2018LA_Seg_Training Set" / cid
        d.mkdir(parents=True)
        image, label = _volume(k)
        datasets = overrides.get(cid, {"image": image, "label": label})
        with h5py.File(d / la.H5_FILE, "w") as f:
            for key, value in datasets.items():
                f.create_dataset(key, data=value, compression="gzip")
    return root


def _nrrd(array_zyx, path, spacing, origin=(10.0, -5.0, 2.5)):
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path))


def make_nrrd_release(root: Path, ids, spacing=(0.625, 0.625, 1.25), skip_label=(), label_spacing=None):
    for k, cid in enumerate(ids):
        d = root / "Training Set" / cid
        d.mkdir(parents=True)
        image, label = _volume(k)
        _nrrd((image.transpose(2, 1, 0) * 100 + 300).astype(np.int16), d / la.RAW_IMAGE_FILE, spacing)
        if cid not in skip_label:
            _nrrd(label.transpose(2, 1, 0) * 255, d / la.RAW_LABEL_FILE, label_spacing or spacing)
    return root


def write_list(path: Path, ids):
    path.write_text("".join(i + "\n" for i in ids))
    return path


def run(tmp_path, *args):
    return la.main(["--output", str(tmp_path / "raw"), *map(str, args)])


def files(folder: Path):
    return sorted(p.name for p in folder.iterdir())


def label_values(path):
    return sorted(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())


def assert_unlabeled_have_no_label(out: Path, unlabeled):
    names = {p.name for p in out.rglob("*")}
    for cid in unlabeled:
        assert f"{cid}_0000.nii.gz" in files(out / "imagesUnlabeled")
        assert f"{cid}.nii.gz" not in names  # no label file anywhere in the output
        assert not any(n.startswith(cid) for n in files(out / "imagesTr") + files(out / "imagesTs"))


def test_h5_custom_lists_layout_spacing_and_axis_order(tmp_path):
    ids = UAMT_TRAIN[:3] + UAMT_TEST[:1]
    src = make_h5_release(tmp_path / "src", ids)
    tr = write_list(tmp_path / "train.txt", ids[:3])
    te = write_list(tmp_path / "test.txt", ids[3:])
    assert run(tmp_path, "-i", src, "-d", 11, "--train-list", tr, "--test-list", te, "--labeled", 2) == 0
    out = tmp_path / "raw" / "Dataset011_LA"
    assert files(tmp_path / "raw") == ["Dataset011_LA"]  # no temporary folder left
    assert files(out / "imagesTr") == sorted(f"{i}_0000.nii.gz" for i in ids[:2])
    assert files(out / "labelsTr") == sorted(f"{i}.nii.gz" for i in ids[:2])
    assert files(out / "imagesTs") == [f"{ids[3]}_0000.nii.gz"] and files(out / "labelsTs") == [f"{ids[3]}.nii.gz"]
    assert_unlabeled_have_no_label(out, [ids[2]])

    img = sitk.ReadImage(str(out / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
    assert img.GetSize() == SHAPE_XYZ  # h5 (x, y, z) order kept as physical x, y, z
    assert img.GetSpacing() == pytest.approx((0.625,) * 3)
    with h5py.File(src / "2018LA_Seg_Training Set" / ids[0] / la.H5_FILE) as f:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), f["image"][()].transpose(2, 1, 0))
    lab = sitk.ReadImage(str(out / "labelsTr" / f"{ids[0]}.nii.gz"))
    assert lab.GetSpacing() == img.GetSpacing() and lab.GetSize() == img.GetSize()
    assert label_values(out / "labelsTs" / f"{ids[3]}.nii.gz") == [0, 1]

    ds = json.loads((out / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "zscore"} and ds["labels"] == {"background": 0, "left_atrium": 1}
    assert (ds["numTraining"], ds["file_ending"]) == (2, ".nii.gz")
    man = json.loads((out / "semiseg_split.json").read_text())
    assert (man["labeled"], man["unlabeled"], man["test"]) == (ids[:2], [ids[2]], [ids[3]])
    assert man["train_list"] == str(tr) and man["labeled_rule"] == "first 2 cases of the training list"
    assert man["source_format"] == "h5" and man["options"]["labeled"] == 2


def test_h5_published_uamt_protocol_and_mcf_fold(tmp_path):
    """Full synthetic release (100 tiny cases): --labeled 4 = first 4 of UA-MT train.list, 76 unlabeled, 20 test."""
    src = make_h5_release(tmp_path / "src", UAMT_TRAIN + UAMT_TEST)
    assert run(tmp_path, "-i", src, "--labeled", 4, "-np", 2, "--normalization", "noNorm") == 0
    out = tmp_path / "raw" / "Dataset101_LA"
    man = json.loads((out / "semiseg_split.json").read_text())
    assert man["labeled"] == UAMT_TRAIN[:4] == common.load_packaged_list("la_train_labeled_first4.txt")
    assert man["unlabeled"] == UAMT_TRAIN[4:] and man["test"] == UAMT_TEST
    assert (man["split"], man["train_list"], man["test_list"]) == ("uamt", "splits/la_train.txt",
                                                                 "splits/la_test.txt")
    assert files(out / "labelsTr") == sorted(f"{i}.nii.gz" for i in UAMT_TRAIN[:4])
    assert len(files(out / "imagesUnlabeled")) == 76 and len(files(out / "labelsTs")) == 20
    assert_unlabeled_have_no_label(out, UAMT_TRAIN[4:])
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["numTraining"] == 4 and ds["channel_names"] == {"0": "noNorm"}

    assert run(tmp_path, "-i", src, "-d", 12, "--split", "mcf_fold1", "--labeled", 16) == 0
    man = json.loads((tmp_path / "raw" / "Dataset012_LA" / "semiseg_split.json").read_text())
    assert man["test"] == UAMT_TRAIN[:20]  # MCF fold 1 tests on the first block of UA-MT train.list
    assert man["labeled"] == UAMT_TEST[:16]  # MCF fold k>0 train starts with the UA-MT test IDs


def test_nrrd_release_keeps_geometry_and_maps_255_to_1(tmp_path):
    ids = UAMT_TRAIN[:2] + UAMT_TEST[:1]
    # the unlabeled case has no laendo.nrrd: it is not needed
    src = make_nrrd_release(tmp_path / "src", ids, skip_label=(ids[1],))
    tr, te = write_list(tmp_path / "tr.txt", ids[:2]), write_list(tmp_path / "te.txt", ids[2:])
    assert run(tmp_path, "-i", src, "--train-list", tr, "--test-list", te, "--labeled", 1) == 0
    out = tmp_path / "raw" / "Dataset101_LA"
    img = sitk.ReadImage(str(out / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((0.625, 0.625, 1.25))
    assert img.GetOrigin() == pytest.approx((10.0, -5.0, 2.5))
    lab = sitk.ReadImage(str(out / "labelsTr" / f"{ids[0]}.nii.gz"))
    assert lab.GetSpacing() == pytest.approx((0.625, 0.625, 1.25)) and lab.GetOrigin() == img.GetOrigin()
    assert label_values(out / "labelsTr" / f"{ids[0]}.nii.gz") == [0, 1]
    assert label_values(out / "labelsTs" / f"{ids[2]}.nii.gz") == [0, 1]
    _, expected_label = _volume(0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab), expected_label.transpose(2, 1, 0))
    assert_unlabeled_have_no_label(out, [ids[1]])
    man = json.loads((out / "semiseg_split.json").read_text())
    assert man["source_format"] == "nrrd" and man["cases"][ids[0]]["spacing_xyz"] == [0.625, 0.625, 1.25]


# ------------------------------------------------------------------------------------------------------------------
# errors: each names the case/file and the fix, and leaves no output behind
# ------------------------------------------------------------------------------------------------------------------
IDS = UAMT_TRAIN[:2] + UAMT_TEST[:1]


def _lists(tmp_path):
    return ["--train-list", write_list(tmp_path / "tr.txt", IDS[:2]),
            "--test-list", write_list(tmp_path / "te.txt", IDS[2:]), "--labeled", 1]


def expect_error(tmp_path, capsys, args, pattern):
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err
    assert pattern in err, err
    raw = tmp_path / "raw"
    leftovers = [p.name for p in raw.iterdir()] if raw.exists() else []
    assert not any(n.startswith(".tmp_") for n in leftovers), leftovers
    return err, leftovers


def test_missing_input_folder(tmp_path, capsys):
    expect_error(tmp_path, capsys, ["-i", tmp_path / "nowhere"], "nowhere does not exist; pass the downloaded")


def test_input_without_cases(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path, capsys, ["-i", tmp_path / "empty"], "No LA cases found in")


def test_case_missing_from_input(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", IDS[:2])
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"1 case(s) of the split lists are missing from the input ({IDS[2]}; first from {tmp_path / 'te.txt'})"
                 f"; expected {src / '2018LA_Seg_Training Set' / '<ID>' / la.H5_FILE}. Fix:")
    # --only-present drops it and records it
    assert run(tmp_path, "-i", src, *_lists(tmp_path), "--only-present") == 0
    man = json.loads((tmp_path / "raw" / "Dataset101_LA" / "semiseg_split.json").read_text())
    assert man["test"] == [] and man["dropped_missing_from_input"] == [IDS[2]]


def test_labeled_case_without_label(tmp_path, capsys):
    src = make_nrrd_release(tmp_path / "src", IDS, skip_label=(IDS[0],))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Case {IDS[0]} has no label: {src / 'Training Set' / IDS[0] / la.RAW_LABEL_FILE} is missing")


def test_wrong_h5_keys(tmp_path, capsys):
    image, label = _volume(0)
    src = make_h5_release(tmp_path / "src", IDS, **{IDS[2]: {"img": image, "seg": label}})
    err, leftovers = expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                                  f"Case {IDS[2]}: {src / '2018LA_Seg_Training Set' / IDS[2] / la.H5_FILE} has "
                                  f"keys ['img', 'seg'], expected ['image', 'label']")
    assert leftovers == []  # failed on the last case: nothing half-written


def test_image_label_shape_mismatch(tmp_path, capsys):
    image, label = _volume(0)
    src = make_h5_release(tmp_path / "src", IDS, **{IDS[0]: {"image": image, "label": label[:, :, :6]}})
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Case {IDS[0]}: image {src / '2018LA_Seg_Training Set' / IDS[0] / la.H5_FILE}['image'] has "
                 f"shape (16, 12, 8) but label")


def test_image_label_spacing_mismatch(tmp_path, capsys):
    src = make_nrrd_release(tmp_path / "src", IDS, label_spacing=(0.625, 0.625, 2.5))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)], "has spacing (0.625, 0.625, 1.25) but label")


def test_label_with_unexpected_values(tmp_path, capsys):
    image, label = _volume(0)
    src = make_h5_release(tmp_path / "src", IDS, **{IDS[0]: {"image": image, "label": label * 3}})
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)], "contains values [3], expected only [0, 1]")


def test_unknown_id_in_labeled_list(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", IDS)
    lab = write_list(tmp_path / "lab.txt", [IDS[0], "NOT_A_CASE"])
    args = ["-i", src, "--train-list", write_list(tmp_path / "tr.txt", IDS[:2]),
            "--test-list", write_list(tmp_path / "te.txt", IDS[2:]), "--labeled-list", lab]
    expect_error(tmp_path, capsys, args, f"Unknown case ID 'NOT_A_CASE' in the labeled list {lab}")
    # an ID in the training list that is not a case of the input is named too
    tr = write_list(tmp_path / "tr2.txt", [IDS[0], "NOT_A_CASE"])
    expect_error(tmp_path, capsys, ["-i", src, "--train-list", tr, "--test-list", tmp_path / "te.txt"],
                 "missing from the input (NOT_A_CASE; first from")


def test_existing_output_needs_overwrite_and_failed_overwrite_keeps_it(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", IDS)
    assert run(tmp_path, "-i", src, *_lists(tmp_path)) == 0
    out = tmp_path / "raw" / "Dataset101_LA"
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path)],
                 f"Output dataset {out} already exists; pass --overwrite")
    # an --overwrite run that fails half-way leaves the old dataset untouched
    os.remove(src / "2018LA_Seg_Training Set" / IDS[2] / la.H5_FILE)
    (src / "2018LA_Seg_Training Set" / IDS[2] / la.H5_FILE).write_bytes(b"truncated")
    expect_error(tmp_path, capsys, ["-i", src, *_lists(tmp_path), "--overwrite"], "as HDF5")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    # a successful --overwrite replaces it
    src2 = make_h5_release(tmp_path / "src2", IDS)
    assert run(tmp_path, "-i", src2, *_lists(tmp_path), "--overwrite", "--labeled", 2) == 0
    assert len(files(out / "labelsTr")) == 2 and files(out / "imagesUnlabeled") == []
    assert files(tmp_path / "raw") == ["Dataset101_LA"]


# ------------------------------------------------------------------------------------------------------------------
# real data: UA-MT h5 subset -> stock nnU-Net planning + our unlabeled preprocessing
# ------------------------------------------------------------------------------------------------------------------
def _semiseg_preprocess_unlabeled_cmd():
    exe = shutil.which("nnUNetv2_semiseg_preprocess_unlabeled")
    if exe:
        return [exe]
    return [sys.executable, "-c", "import sys; from nnunetv2_semiseg.data.preprocess_unlabeled import main; "
                                  "sys.exit(main(sys.argv[1:]))"]


@pytest.mark.skipif(not REAL_LA.is_dir(), reason="real LA subset not available (set nnUNet_semiseg_LA_h5)")
def test_real_la_subset_through_nnunet(tmp_path, monkeypatch):
    pytest.importorskip("nnunetv2")
    raw, pre, res = tmp_path / "raw", tmp_path / "pre", tmp_path / "res"
    for name, folder in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        folder.mkdir()
        monkeypatch.setenv(name, str(folder))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")  # 0 crashes the planner
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    # 2 labeled + 1 unlabeled from UA-MT train.list, 1 test from test.list (all in the subset)
    tr = write_list(tmp_path / "tr.txt", UAMT_TRAIN[:3])
    te = write_list(tmp_path / "te.txt", UAMT_TEST[:1])
    assert la.main(["-i", str(REAL_LA), "-d", "931", "--train-list", str(tr), "--test-list", str(te),
                    "--labeled", "2"]) == 0  # --output defaults to $nnUNet_raw
    out = raw / "Dataset931_LA"
    assert files(out / "labelsTr") == sorted(f"{i}.nii.gz" for i in UAMT_TRAIN[:2])
    assert_unlabeled_have_no_label(out, [UAMT_TRAIN[2]])
    with h5py.File(REAL_LA / "2018LA_Seg_Training Set" / UAMT_TRAIN[0] / la.H5_FILE) as f:
        shape_xyz = f["image"].shape
        n_foreground = int(f["label"][()].sum())
    lab = sitk.ReadImage(str(out / "labelsTr" / f"{UAMT_TRAIN[0]}.nii.gz"))
    assert lab.GetSize() == shape_xyz and lab.GetSpacing() == pytest.approx((0.625,) * 3)
    assert int(sitk.GetArrayFromImage(lab).sum()) == n_foreground

    env = dict(os.environ)
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", "931", "-c", "3d_fullres", "-np", "1", "-npfp", "1",
                    "--verify_dataset_integrity"], check=True, env=env, capture_output=True, timeout=600)
    plans = json.loads((pre / "Dataset931_LA" / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == pytest.approx([0.625] * 3)
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    assert sorted(p.name for p in (pre / "Dataset931_LA" / cfg["data_identifier"]).glob("*.b2nd")
                  if not p.name.endswith("_seg.b2nd")) == sorted(f"{i}.b2nd" for i in UAMT_TRAIN[:2])

    subprocess.run([*_semiseg_preprocess_unlabeled_cmd(), "-d", "931", "-c", "3d_fullres", "-np", "1"],
                   check=True, env=env, capture_output=True, timeout=600)
    unlabeled = pre / "Dataset931_LA" / f"{cfg['data_identifier']}_unlabeled"
    assert sorted(p.name for p in unlabeled.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")) == [
        f"{UAMT_TRAIN[2]}.b2nd"]


def test_target_spacing_resamples_every_file_before_the_folder_appears(tmp_path, capsys):
    ids = UAMT_TRAIN[:2] + UAMT_TEST[:1]
    src = make_h5_release(tmp_path / "src", ids)
    tr = write_list(tmp_path / "train.txt", ids[:2])
    te = write_list(tmp_path / "test.txt", ids[2:])
    assert run(tmp_path, "-i", src, "-d", 11, "--train-list", tr, "--test-list", te, "--labeled", 1,
               "--target-spacing", "1.25", "1.25", "keep") == 0
    out = tmp_path / "raw" / "Dataset011_LA"
    assert "Resampled 5 files." in capsys.readouterr().out          # 3 images + 2 labels (labeled and test)
    assert not any(p.name.startswith(".") for p in out.rglob("*"))   # no staged file left
    image, label = _volume(0)                                       # the first case, (x, y, z) arrays
    img = sitk.ReadImage(str(out / "imagesTr" / f"{ids[0]}_0000.nii.gz"))
    assert img.GetSpacing() == pytest.approx((1.25, 1.25, 0.625)) and img.GetSize() == (8, 6, 8)
    # each new voxel centre lies midway in a 2 x 2 block of the old grid: linear = the block's mean
    expected = image.reshape(8, 2, 6, 2, 8).mean((1, 3)).transpose(2, 1, 0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(img), expected, atol=1e-5)
    # label x 4..9, y 3..7: blocks x (4,5)(6,7)(8,9) and y (2,3) half, (4,5), (6,7) reach 0.5 -> foreground
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / f"{ids[0]}.nii.gz")))
    want = np.zeros((8, 6, 8), np.uint8)
    want[2:6, 1:4, 2:5] = 1
    np.testing.assert_array_equal(got, want)
    assert label_values(out / "labelsTs" / f"{ids[2]}.nii.gz") == [0, 1]


def test_target_spacing_must_be_positive_or_keep(tmp_path, capsys):
    src = make_h5_release(tmp_path / "src", UAMT_TRAIN[:1])
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "-i", src, "--target-spacing", "0", "1", "keep")
    assert info.value.code == 2
    assert "'0' is no spacing: give a positive number of mm or 'keep'" in capsys.readouterr().err
    assert not (tmp_path / "raw").exists()
