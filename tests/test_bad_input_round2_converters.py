"""Converter bad input, round two: a patient in two folders (ACDC), non-finite voxels, unwritable output."""
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dataset_conversion import acdc, common
from test_convert_acdc import make_nifti_release


def test_acdc_patient_in_training_and_testing_is_refused_naming_both(tmp_path):
    root = make_nifti_release(tmp_path / "acdc", ["patient001", "patient002"])
    copy = root / "testing" / "patient002"
    copy.parent.mkdir()
    (root / "training" / "patient002").rename(copy)
    make_nifti_release(tmp_path / "acdc", ["patient002"])  # a second patient002 under training/
    with pytest.raises(common.ConversionError) as info:
        acdc.find_patients(root, "auto")
    assert str(info.value) == (
        f"Patient patient002 is present twice: {root / 'training' / 'patient002'} and {copy}. Remove or rename one "
        f"copy (the release has training/patient001..100 and testing/patient101..150), or point -i at the folder "
        f"that holds the copy you want.")


def _leftovers(raw: Path):
    return sorted(p.name for p in raw.iterdir()) if raw.is_dir() else []


def test_la_h5_with_nan_and_inf_is_refused_naming_case_and_counts(tmp_path, capsys):
    import h5py
    from dataset_conversion import la
    from test_convert_la import make_h5_release, write_list
    ids = ["A" * 20, "B" * 20]
    src = make_h5_release(tmp_path / "la", ids)
    bad = src / "2018LA_Seg_Training Set" / ids[1] / la.H5_FILE
    with h5py.File(bad, "r+") as f:
        image = f["image"][()]
        image[0, 0, :3] = np.nan
        image[1, 1, 1] = np.inf
        del f["image"]
        f.create_dataset("image", data=image)
    rc = la.main(["--output", str(tmp_path / "raw"), "-i", str(src), "--train-list",
                  str(write_list(tmp_path / "tr.txt", ids)), "--test-list", str(write_list(tmp_path / "te.txt", []))])
    assert rc == 2
    assert capsys.readouterr().err == (
        f"ERROR: Case {ids[1]}: {bad} holds 4 non-finite voxel(s) of {image.size} (3 NaN, 1 Inf); nnU-Net's "
        f"normalisation would make the whole case NaN. Replace them in the source (e.g. with the background value) "
        f"or exclude the case from the lists.\n")
    assert _leftovers(tmp_path / "raw") == []  # temporary folder removed, nothing written


def test_pancreas_h5_with_nan_is_refused(tmp_path):
    import h5py
    from dataset_conversion import pancreas
    from test_convert_pancreas import run, write_h5
    src = tmp_path / "coranet_h5"
    for no in (1, 2, 64):
        write_h5(src / f"{no:04d}.h5", no)
    with h5py.File(src / "0002.h5", "r+") as f:
        f["image"][3, 3, 3] = np.nan
    with pytest.raises(common.ConversionError, match=r"^Case PANCREAS_0002: .*0002\.h5 holds 1 non-finite voxel\(s\) "
                                                     r"of 1536 \(1 NaN, 0 Inf\)"):
        run(["-i", src, "--output", tmp_path / "raw", "--split", "coranet", "--only-present"])
    assert not (tmp_path / "raw" / "Dataset104_PancreasCT").exists()


# ---------------------------------------------------------------------------------------------------- output
def _la_release(tmp_path):
    from test_convert_la import make_h5_release, write_list
    ids = ["A" * 20, "B" * 20]
    src = make_h5_release(tmp_path / "la", ids)
    lists = ["--train-list", str(write_list(tmp_path / "tr.txt", ids)),
             "--test-list", str(write_list(tmp_path / "te.txt", []))]
    return src, lists


def test_converter_output_below_a_file_is_one_line(tmp_path, capsys):
    from dataset_conversion import la
    src, lists = _la_release(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    assert la.main(["--output", str(blocker / "raw"), "-i", str(src), *lists]) == 2
    assert capsys.readouterr().err == (
        f"ERROR: Cannot write {blocker / 'raw'}: {blocker} is a file, not a folder (ENOTDIR). Choose an output "
        f"location that is not below a file. The temporary folder was removed; nothing was written.\n")


def test_converter_disk_full_keeps_the_old_dataset(tmp_path, capsys, monkeypatch):
    import errno
    from dataset_conversion import la
    src, lists = _la_release(tmp_path)
    raw = tmp_path / "raw"
    assert la.main(["--output", str(raw), "-i", str(src), *lists]) == 0
    target = raw / "Dataset101_LA"
    before = sorted((p.relative_to(target), p.stat().st_size) for p in target.rglob("*"))
    write_nifti = common.write_nifti
    calls = []

    def full_disk(array, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # some files are written, then the disk is full
            Path(path).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_nifti(array, path, *args, **kwargs)

    monkeypatch.setattr(common, "write_nifti", full_disk)
    assert la.main(["--output", str(raw), "-i", str(src), *lists, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR: Cannot write {calls[2]}: the disk is full (ENOSPC). Free space there or choose "
                          f"another output location. The temporary folder was removed; {target} is unchanged.")
    assert err.count("\n") == 1
    assert sorted((p.relative_to(target), p.stat().st_size) for p in target.rglob("*")) == before
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset101_LA"]  # no temporary folder left


@pytest.mark.parametrize("writer_message", [
    "[enforce fail at inline_container.cc:603] . unexpected pos 6720 vs 6608",      # torch.save
    "Error while creating the NDArray",                                             # blosc2
    "Exception thrown in SimpleITK ImageFileWriter_Execute: NWAD: wrote only 0 of 6144 bytes to x.nii.gz",  # ITK
])
def test_writer_messages_without_errno_are_read_as_disk_full_when_space_is_low(tmp_path, monkeypatch,
                                                                               writer_message):
    import shutil
    from nnunetv2_semiseg.utilities import write_errors
    monkeypatch.setattr(write_errors.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    message = write_errors.describe_write_failure(RuntimeError(writer_message), tmp_path / "out")
    assert message.startswith(f"Cannot write {tmp_path / 'out'}: the disk is full (ENOSPC; 0 MB free; the writer "
                              f"said: {writer_message[:40]}")
    assert write_errors.describe_write_failure(RuntimeError("unrelated"), tmp_path) is None


def test_write_found_lists_of_a_partial_download_then_convert_with_them(tmp_path, capsys):
    from dataset_conversion import la
    from test_convert_la import make_h5_release
    train, test = common.load_packaged_list("la_train.txt"), common.load_packaged_list("la_test.txt")
    have = [train[5], train[0], test[3]]  # a partial copy of the published UA-MT split
    src = make_h5_release(tmp_path / "la", have)
    found = tmp_path / "found"
    assert la.main(["--output", str(tmp_path / "raw"), "-i", str(src), "--write_found_lists", str(found)]) == 2
    err = capsys.readouterr().err
    note = (f"The lists of the cases present were written to {found}/train.txt (2) and {found}/test.txt (1): pass "
            f"--train_list {found}/train.txt --test_list {found}/test.txt.")
    assert err.splitlines()[-1].startswith("ERROR: 97 case(s) of the split lists are missing from the input")
    assert err.splitlines()[-1].endswith(note)
    assert (found / "train.txt").read_text() == f"{train[0]}\n{train[5]}\n"  # published order kept
    assert (found / "test.txt").read_text() == f"{test[3]}\n"
    assert la.main(["--output", str(tmp_path / "raw"), "-i", str(src), "--train_list", str(found / "train.txt"),
                    "--test_list", str(found / "test.txt"), "--labeled", "1"]) == 0
    out = tmp_path / "raw" / "Dataset101_LA"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{train[0]}_0000.nii.gz"]
    assert sorted(p.name for p in (out / "imagesUnlabeled").iterdir()) == [f"{train[5]}_0000.nii.gz"]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{test[3]}_0000.nii.gz"]
