"""Shared converter helpers: split resolution, ID lists, atomic output, NIfTI/dataset.json writing, packaged lists."""
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import common
from dataset_conversion.common import ConversionError

TRAIN = ["a", "b", "c", "d", "e"]
TEST = ["x", "y"]


def resolve(**kw):
    return common.resolve_split(TRAIN, TEST, train_source="train.txt", test_source="test.txt", **kw)


def test_labeled_is_first_n_of_training_list():
    s = resolve(labeled_n=2)
    assert (s.labeled, s.unlabeled, s.test) == (["a", "b"], ["c", "d", "e"], ["x", "y"])
    assert s.provenance["labeled_rule"] == "first 2 cases of the training list"
    assert s.provenance["train_list"] == "train.txt"


def test_labeled_list_keeps_training_order_and_default_is_fully_supervised():
    s = resolve(labeled_ids=["d", "b"], labeled_source="lab.txt")
    assert (s.labeled, s.unlabeled) == (["b", "d"], ["a", "c", "e"])
    full = resolve()
    assert (full.labeled, full.unlabeled) == (TRAIN, [])


@pytest.mark.parametrize("n", [0, 6])
def test_labeled_n_out_of_range(n):
    with pytest.raises(ConversionError, match=rf"--labeled {n} is out of range.*has 5 cases"):
        resolve(labeled_n=n)


def test_unknown_labeled_id_is_named():
    with pytest.raises(ConversionError, match=r"Unknown case ID 'zz' in the labeled list lab.txt"):
        resolve(labeled_ids=["a", "zz"], labeled_source="lab.txt")
    with pytest.raises(ConversionError, match=r"'x'.*it is in the test list"):
        resolve(labeled_ids=["x"], labeled_source="lab.txt")


def test_missing_cases_fail_or_are_dropped_and_recorded():
    present = {"a", "c", "d", "e", "y"}
    with pytest.raises(ConversionError, match=r"2 case\(s\) of the split lists are missing from the input \(b, x;"):
        resolve(labeled_n=2, present=present)
    s = resolve(labeled_n=2, present=present, only_present=True)
    assert (s.labeled, s.unlabeled, s.test) == (["a", "c"], ["d", "e"], ["y"])
    assert s.provenance["dropped_missing_from_input"] == ["b", "x"]


def test_train_test_overlap_is_refused():
    with pytest.raises(ConversionError, match=r"case b is in both the training list"):
        common.resolve_split(["a", "b"], ["b"], train_source="t", test_source="s")


def test_id_list_parsing(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# header\nA\n\nB  # comment\n C \n")
    assert common.read_id_list(f) == ["A", "B", "C"]
    f.write_text("A\nB\nA\n")
    with pytest.raises(ConversionError, match=r"l.txt, line 3: case ID 'A' appears twice"):
        common.read_id_list(f)
    with pytest.raises(ConversionError, match=r"List file .*nope.txt does not exist"):
        common.read_id_list(tmp_path / "nope.txt")


# every list file the four converters use, with its published length
PACKAGED = {"la_train.txt": 80, "la_test.txt": 20, "la_mcf_fold3_train.txt": 80, "la_mcf_fold3_test.txt": 20,
            "acdc_train_patients.txt": 70, "acdc_val_patients.txt": 10, "acdc_test_patients.txt": 20,
            "acdc_train.txt": 140, "acdc_train_slices.txt": 1312,
            "brats2019_ssl4mis_train.txt": 250, "brats2019_ssl4mis_val.txt": 25, "brats2019_ssl4mis_test.txt": 60,
            "pancreas_coranet_train_lab.txt": 12, "pancreas_coranet_train_unlab.txt": 50,
            "pancreas_coranet_test.txt": 18, "pancreas_mcnet_train.txt": 62, "pancreas_mcnet_test.txt": 20,
            "pancreas_mcf_fold2_train.txt": 61, "pancreas_mcf_fold2_test.txt": 21}


def test_packaged_lists_are_shipped_with_their_origin():
    for name, n in PACKAGED.items():
        assert len(common.load_packaged_list(name)) == n, name
    assert common.load_packaged_list("la_train_labeled_first8.txt") == common.load_packaged_list("la_train.txt")[:8]
    assert common.load_packaged_list("acdc_train_labeled_first3_patients.txt") == [
        "patient099", "patient038", "patient050"]
    readme = common.packaged_list_path("README.md").read_text()
    assert "yulequan/UA-MT" in readme and "HiLab-git/SSL4MIS" in readme and "koncle/CoraNet" in readme
    with pytest.raises(ConversionError, match=r"Packaged split list nope.txt not found"):
        common.load_packaged_list("nope.txt")


def test_dataset_writer_moves_complete_folder_into_place(tmp_path):
    with common.DatasetWriter(tmp_path, "Dataset007_X") as w:
        assert w.tmp.parent == tmp_path and w.tmp.name.startswith(".tmp_Dataset007_X_")
        assert not (tmp_path / "Dataset007_X").exists()  # nothing visible before the end
        (w.path("imagesTr") / "f.txt").write_text("new")
    assert (tmp_path / "Dataset007_X" / "imagesTr" / "f.txt").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "Dataset007_X").iterdir()) == [
        "imagesTr", "imagesTs", "imagesUnlabeled", "labelsTr", "labelsTs"]
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_X"]


def test_dataset_writer_refuses_existing_and_keeps_it_on_failure(tmp_path):
    target = tmp_path / "Dataset007_X"
    target.mkdir()
    (target / "old.txt").write_text("old")
    (target / "dataset.json").write_text("{}")  # --overwrite replaces only a raw dataset folder
    with pytest.raises(ConversionError, match=r"Dataset007_X already exists; pass --overwrite"):
        with common.DatasetWriter(tmp_path, "Dataset007_X"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with common.DatasetWriter(tmp_path, "Dataset007_X", overwrite=True) as w:
            (w.path("imagesTr") / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_X"]  # temp folder removed
    assert sorted(p.name for p in target.iterdir()) == ["dataset.json", "old.txt"]
    with common.DatasetWriter(tmp_path, "Dataset007_X", overwrite=True) as w:
        (w.path("labelsTr") / "n.txt").write_text("n")
    assert not (target / "old.txt").exists() and (target / "labelsTr" / "n.txt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["Dataset007_X"]  # no backup left behind


def test_dataset_writer_refuses_duplicate_dataset_id(tmp_path):
    (tmp_path / "Dataset007_Other").mkdir()
    with pytest.raises(ConversionError, match=r"Dataset007_Other already uses the dataset ID"):
        common.DatasetWriter(tmp_path, "Dataset007_X", overwrite=True).check_target()


def test_output_root_and_folder_name(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    assert common.resolve_output_root(None) == tmp_path
    assert common.resolve_output_root(tmp_path / "o") == tmp_path / "o"
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ConversionError, match=r"pass --output FOLDER or set .*nnUNet_raw"):
        common.resolve_output_root(None)
    assert common.dataset_folder_name(7, "LA") == "Dataset007_LA"
    with pytest.raises(ConversionError, match="out of range"):
        common.dataset_folder_name(1000, "LA")


def test_write_nifti_geometry_and_dataset_json(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)  # (z, y, x)
    direction = (0, 1, 0, 1, 0, 0, 0, 0, 1)
    common.write_nifti(arr, tmp_path / "a.nii.gz", (0.5, 0.75, 3.0), (1, 2, 3), direction)
    img = sitk.ReadImage(str(tmp_path / "a.nii.gz"))
    assert img.GetSize() == (4, 3, 2)
    assert img.GetSpacing() == pytest.approx((0.5, 0.75, 3.0))
    assert img.GetOrigin() == pytest.approx((1, 2, 3))
    assert img.GetDirection() == pytest.approx(direction)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), arr)

    d = common.write_dataset_json(tmp_path, {0: "noNorm"}, {"background": 0, "fg": 1}, 3, numUnlabeled=5)
    assert json.loads((tmp_path / "dataset.json").read_text()) == d == {
        "channel_names": {"0": "noNorm"}, "labels": {"background": 0, "fg": 1}, "numTraining": 3,
        "file_ending": ".nii.gz", "numUnlabeled": 5}
    with pytest.raises(ValueError, match="consecutive"):
        common.write_dataset_json(tmp_path, {0: "CT"}, {"background": 0, "fg": 2}, 1)


def test_output_paths_give_unlabeled_cases_no_label():
    img, lab = common.output_paths("/d", common.ROLE_UNLABELED, "c1")
    assert img == Path("/d/imagesUnlabeled/c1_0000.nii.gz") and lab is None
    assert common.output_paths("/d", common.ROLE_LABELED, "c1") == (
        Path("/d/imagesTr/c1_0000.nii.gz"), Path("/d/labelsTr/c1.nii.gz"))
    assert common.output_paths("/d", common.ROLE_TEST, "c1", channel=2) == (
        Path("/d/imagesTs/c1_0002.nii.gz"), Path("/d/labelsTs/c1.nii.gz"))


def test_read_h5_errors(tmp_path):
    import h5py

    with h5py.File(tmp_path / "k.h5", "w") as f:
        f["img"] = np.zeros(3)
    with pytest.raises(ConversionError, match=r"Case c: .*k.h5 has keys \['img'\], expected \['image', 'label'\]"):
        common.read_h5(tmp_path / "k.h5", ("image", "label"), "c")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(ConversionError, match=r"Case c: cannot read .*bad.h5 as HDF5"):
        common.read_h5(tmp_path / "bad.h5", ("image",), "c")
    with pytest.raises(ConversionError, match=r"Case c: file .*none.h5 is missing"):
        common.read_h5(tmp_path / "none.h5", ("image",), "c")


def test_labeled_list_with_only_present_drops_missing_labeled_cases():
    s = resolve(labeled_ids=["a", "b"], labeled_source="lab.txt", present={"a", "c", "x", "y"}, only_present=True)
    assert (s.labeled, s.unlabeled, s.test) == (["a"], ["c"], ["x", "y"])
    assert s.provenance["dropped_missing_from_input"] == ["b", "d", "e"]
    with pytest.raises(ConversionError, match=r"None of the cases in the labeled list lab.txt is present"):
        resolve(labeled_ids=["b"], labeled_source="lab.txt", present={"a", "x"}, only_present=True)
    # a wrong list entry is reported even when cases are missing from the input
    with pytest.raises(ConversionError, match=r"Unknown case ID 'zz' in the labeled list"):
        resolve(labeled_ids=["zz"], labeled_source="lab.txt", present={"a"})
