"""nnUNetv2_semiseg_evaluate / evaluate_folders on tiny synthetic NIfTI folders with hand-computed expectations."""

import csv
import json
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_semiseg.evaluation.evaluate import EvaluationError, evaluate_folders, main

# Arrays are (z, y, x) as SimpleITK returns them; spacing is written in SimpleITK's (x, y, z) order.
SHAPE = (16, 16, 20)
SPACING_XYZ = (2.0, 1.0, 1.0)  # 2 mm along x, the axis of the shift below


def write(path, array, spacing=SPACING_XYZ):
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing))
    sitk.WriteImage(image, str(path))


def cube_seg(x0, label=1, side=10):
    seg = np.zeros(SHAPE, np.uint8)
    seg[3:3 + side, 3:3 + side, x0:x0 + side] = label
    return seg


@pytest.fixture
def folders(tmp_path):
    """case_a: perfect. case_b: cube of side 10 shifted by 3 voxels along x.
    Label 2 (a 2x2x2 block) is in case_a's reference and prediction only: in case_b both masks are empty."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    a = cube_seg(2)
    a[0:2, 0:2, 0:2] = 2
    write(ref / "case_a.nii.gz", a)
    write(pred / "case_a.nii.gz", a)
    write(ref / "case_b.nii.gz", cube_seg(2))
    write(pred / "case_b.nii.gz", cube_seg(5))
    # files that are not images are ignored in both folders (nnU-Net writes these into prediction folders)
    (pred / "dataset.json").write_text("{}")
    (pred / "plans.json").write_text("{}")
    return ref, pred


# expected values for the shifted cube (derivation in test_evaluation_metrics.py)
B_DICE, B_JAC = 0.7, 7 / 13
B_HD_VOX, B_ASD_VOX = 3.0, 524 / 488
B_HD_MM, B_ASD_MM = 6.0, 936 / 488


def test_evaluate_folders_values(folders):
    ref, pred = folders
    res = evaluate_folders(str(ref), str(pred))
    assert res["labels"] == ["1", "2"]  # found in the references
    assert res["num_cases"] == 2
    per = {c["case"]: c for c in res["per_case"]}
    assert per["case_a"]["metrics"]["1"]["dice"] == 1.0
    b1 = per["case_b"]["metrics"]["1"]
    assert b1["dice"] == pytest.approx(B_DICE) and b1["jaccard"] == pytest.approx(B_JAC)
    assert b1["hd95_voxel"] == pytest.approx(B_HD_VOX) and b1["asd_voxel"] == pytest.approx(B_ASD_VOX)
    assert b1["hd95_mm"] == pytest.approx(B_HD_MM) and b1["asd_mm"] == pytest.approx(B_ASD_MM)
    # label 2 absent from both masks of case_b: Dice 1, distances 0 (default convention)
    b2 = per["case_b"]["metrics"]["2"]
    assert b2["dice"] == 1.0 and b2["hd95_mm"] == 0.0 and b2["n_ref"] == 0
    assert per["case_b"]["mean_foreground"]["dice"] == pytest.approx((B_DICE + 1) / 2)
    assert per["case_a"]["spacing"] == list(SPACING_XYZ)
    # mean over cases per class, then over classes
    assert res["mean"]["1"]["dice"] == pytest.approx((1 + B_DICE) / 2)
    assert res["mean"]["1"]["hd95_mm"] == pytest.approx(B_HD_MM / 2)
    assert res["mean"]["1"]["asd_voxel"] == pytest.approx(B_ASD_VOX / 2)
    assert res["std"]["1"]["dice"] == pytest.approx((1 - B_DICE) / 2)
    assert res["mean"]["2"]["dice"] == 1.0
    assert res["foreground_mean"]["dice"] == pytest.approx(((1 + B_DICE) / 2 + 1) / 2)
    assert res["excluded"]["1"]["hd95_voxel"] == 0


def test_command_writes_json_csv_and_prints_table(folders, tmp_path, capsys):
    ref, pred = folders
    out = tmp_path / "results" / "eval.json"
    assert main(["-ref", str(ref), "-pred", str(pred), "-l", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| class | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | 95HD (mm) | ASD (mm) |" in printed
    # mean over the 2 cases: Dice 85.00 %, Jaccard (1 + 7/13)/2 = 76.92 %, 95HD 1.50 voxels / 3.00 mm
    assert f"| 1 | 85.00 | 76.92 | 1.50 | {B_ASD_VOX / 2:.2f} | 3.00 | {B_ASD_MM / 2:.2f} |" in printed
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["labels"] == ["1"]
    assert data["mean"]["1"]["hd95_voxel"] == pytest.approx(1.5)
    assert data["foreground_mean"]["jaccard"] == pytest.approx((1 + B_JAC) / 2)
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    by = {(r["case"], r["label"]): r for r in rows}
    assert float(by[("case_b", "1")]["dice"]) == pytest.approx(B_DICE)
    assert float(by[("case_b", "1")]["asd_mm"]) == pytest.approx(B_ASD_MM, rel=1e-5)
    assert float(by[("mean", "mean_fg")]["hd95_mm"]) == pytest.approx(3.0)
    assert int(by[("case_b", "1")]["n_ref"]) == 1000
    assert sorted(os.listdir(out.parent)) == ["eval.csv", "eval.json"]  # no temporary files left


def test_default_output_in_prediction_folder(folders):
    ref, pred = folders
    assert main(["-ref", str(ref), "-pred", str(pred)]) == 0
    assert (pred / "summary_semiseg.json").is_file() and (pred / "summary_semiseg.csv").is_file()
    # a second run does not mistake the outputs for cases
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(pred)]) == 0


def test_regions_and_dataset_json(folders, tmp_path):
    ref, pred = folders
    # region 1,2 in case_b equals label 1 (no label 2 there); in case_a it is perfect
    res = evaluate_folders(str(ref), str(pred), labels=["1,2", 2])
    assert res["labels"] == ["1,2", "2"]
    assert res["mean"]["1,2"]["dice"] == pytest.approx((1 + B_DICE) / 2)
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2], "core": 2},
                              "file_ending": ".nii.gz"}))
    out = tmp_path / "o.json"
    assert main(["-ref", str(ref), "-pred", str(pred), "-dj", str(dj), "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["labels"] == ["1,2", "2"]
    assert data["label_names"] == {"1,2": "whole", "2": "core"}
    assert data["mean"]["1,2"]["hd95_mm"] == pytest.approx(B_HD_MM / 2)


def test_lcc_removes_spurious_blob(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    write(ref / "c.nii.gz", cube_seg(2))
    p = cube_seg(2)
    p[15, 15, 19] = 1  # an isolated voxel far from the cube
    write(pred / "c.nii.gz", p)
    plain = evaluate_folders(str(ref), str(pred))
    assert plain["mean"]["1"]["dice"] == pytest.approx(2000 / 2001)
    assert plain["mean"]["1"]["asd_voxel"] > 0
    post = evaluate_folders(str(ref), str(pred), lcc=True)
    assert post["settings"]["lcc"] is True
    assert post["mean"]["1"]["dice"] == 1.0
    assert post["mean"]["1"]["hd95_voxel"] == 0.0 and post["mean"]["1"]["asd_mm"] == 0.0


def test_empty_prediction_conventions(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    write(ref / "c1.nii.gz", cube_seg(2))
    write(pred / "c1.nii.gz", cube_seg(5))
    write(ref / "c2.nii.gz", cube_seg(2))
    write(pred / "c2.nii.gz", np.zeros(SHAPE))  # missed completely
    res = evaluate_folders(str(ref), str(pred))
    assert res["mean"]["1"]["dice"] == pytest.approx(B_DICE / 2)
    # the NaN distance of c2 is excluded from the mean and counted
    assert res["mean"]["1"]["hd95_voxel"] == pytest.approx(B_HD_VOX)
    assert res["excluded"]["1"]["hd95_voxel"] == 1
    c2 = [c for c in res["per_case"] if c["case"] == "c2"][0]
    assert math.isnan(c2["metrics"]["1"]["asd_mm"])
    lit = evaluate_folders(str(ref), str(pred), empty_convention="literature")
    assert lit["mean"]["1"]["hd95_voxel"] == pytest.approx(B_HD_VOX / 2)  # the 0 is averaged in
    assert lit["excluded"]["1"]["hd95_voxel"] == 0
    out = tmp_path / "e.json"
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(out)]) == 0
    assert "excluded from the means: 1: 1 case(s)" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [c for c in data["per_case"] if c["case"] == "c2"][0]["metrics"]["1"]["hd95_mm"] is None
    assert main(["-ref", str(ref), "-pred", str(pred), "-o", str(out), "--empty", "literature"]) == 0


def test_other_file_endings_matched_by_case_id(tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    write(ref / "case_1.nrrd", cube_seg(2))
    write(pred / "case_1.mha", cube_seg(5))
    res = evaluate_folders(str(ref), str(pred), labels=[1])
    assert res["per_case"][0]["case"] == "case_1"
    assert res["mean"]["1"]["asd_mm"] == pytest.approx(B_ASD_MM)


def test_parallel_matches_sequential(folders):
    ref, pred = folders
    seq = evaluate_folders(str(ref), str(pred))
    par = evaluate_folders(str(ref), str(pred), num_processes=2)
    assert par["mean"] == seq["mean"]


# ---------------------------------------------------------------------------------------------- bad input
def run_error(argv, capsys):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_and_extra_cases_fail_clearly(folders, capsys):
    ref, pred = folders
    os.remove(pred / "case_b.nii.gz")
    err = run_error(["-ref", str(ref), "-pred", str(pred)], capsys)
    assert "case_b" in err and "no prediction" in err and "--chill" in err
    assert not (pred / "summary_semiseg.json").exists()
    res = evaluate_folders(str(ref), str(pred), chill=True)
    assert res["num_cases"] == 1 and res["missing_predictions"] == ["case_b"]
    write(pred / "case_c.nii.gz", cube_seg(2))
    err = run_error(["-ref", str(ref), "-pred", str(pred), "--chill"], capsys)
    assert "case_c" in err and "no reference" in err


def test_shape_mismatch_fails_clearly(folders, capsys):
    ref, pred = folders
    image = sitk.GetImageFromArray(np.zeros((16, 16, 21), np.uint8))
    image.SetSpacing(SPACING_XYZ)
    sitk.WriteImage(image, str(pred / "case_b.nii.gz"))
    err = run_error(["-ref", str(ref), "-pred", str(pred)], capsys)
    assert "case case_b" in err and "size" in err and "(21, 16, 16)" in err and "reference image grid" in err


def test_spacing_mismatch_fails_clearly(folders, capsys):
    ref, pred = folders
    write(pred / "case_b.nii.gz", cube_seg(5), spacing=(2.0, 1.0, 1.01))
    err = run_error(["-ref", str(ref), "-pred", str(pred)], capsys)
    assert "case case_b" in err and "spacing" in err and "1.01" in err
    # within the 1e-3 relative tolerance: accepted
    write(pred / "case_b.nii.gz", cube_seg(5), spacing=(2.0, 1.0, 1.0005))
    assert evaluate_folders(str(ref), str(pred))["num_cases"] == 2


def test_bad_label_spec_and_empty_folder(folders, tmp_path, capsys):
    ref, pred = folders
    assert "labels must be > 0" in run_error(["-ref", str(ref), "-pred", str(pred), "-l", "0"], capsys)
    assert "invalid label" in run_error(["-ref", str(ref), "-pred", str(pred), "-l", "a"], capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no prediction image files" in run_error(["-ref", str(ref), "-pred", str(empty)], capsys)
    with pytest.raises(EvaluationError, match="folder not found"):
        evaluate_folders(str(tmp_path / "nope"), str(pred))
