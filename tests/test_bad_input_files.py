"""Issue 13, file-level bad input: data loss by --overwrite, corrupt or unusual converter inputs, misleading scores,
unreadable checkpoints, killed runs and folder modes. One test per class; each fails on the code before the fix."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dataset_conversion import acdc, common, la
from nnunetv2_semiseg import export_plain
from nnunetv2_semiseg.evaluation.evaluate import main as evaluate_main


# ---------------------------------------------------------------------------------------------------------------
# helpers
def write_list(path: Path, ids) -> Path:
    path.write_text("".join(i + "\n" for i in ids))
    return path


def make_la_h5(root: Path, ids, shape_xyz=(16, 12, 8), label_dtype=np.uint8, label_value=1, compression="gzip"):
    """UA-MT layout <root>/2018LA_Seg_Training Set/<ID>/mri_norm2.h5 (arrays x, y, z)."""
    for k, cid in enumerate(ids):
        d = root / "2018LA_Seg_Training Set" / cid
        d.mkdir(parents=True)
        rng = np.random.default_rng(k)
        label = np.zeros(shape_xyz, label_dtype)
        label[2:6, 2:6, 2:5] = label_value
        with h5py.File(d / la.H5_FILE, "w") as f:
            f.create_dataset("image", data=rng.normal(size=shape_xyz).astype(np.float32), compression=compression)
            f.create_dataset("label", data=label, compression=compression)
    return root


def make_acdc_nifti(root: Path, patients, shape_zyx=(4, 12, 10), spacing=None):
    """ACDC layout <root>/training/patientXXX/{Info.cfg, patientXXX_frameYY[_gt].nii.gz}, frames 1 and 7.
    spacing: {patient: spacing (x, y, z)} instead of (1.5, 1.5, 10)."""
    for k, p in enumerate(patients):
        d = root / "training" / p
        d.mkdir(parents=True)
        (d / "Info.cfg").write_text("ED: 1\nES: 7\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\nWeight: 80.0\n")
        for frame in (1, 7):
            image = np.random.default_rng(k * 10 + frame).integers(0, 400, size=shape_zyx).astype(np.int16)
            label = np.zeros(shape_zyx, np.uint8)
            label[1:3, 2:5, 2:5] = 1
            for array, name in ((image, f"{p}_frame{frame:02d}.nii.gz"), (label, f"{p}_frame{frame:02d}_gt.nii.gz")):
                img = sitk.GetImageFromArray(array)
                img.SetSpacing((spacing or {}).get(p, (1.5, 1.5, 10.0)))
                sitk.WriteImage(img, str(d / name))
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def seg(path: Path, array, origin=(0.0, 0.0, 0.0), direction=None):
    img = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


def cube(shape=(8, 10, 12), value=1):
    a = np.zeros(shape, np.uint8)
    a[2:6, 2:7, 3:9] = value
    return a


# ---------------------------------------------------------------------------------------------------------------
# 1. data loss: --overwrite onto the input
@pytest.fixture
def trained_model(tiny_dataset, tmp_path):
    """A model folder as our trainers leave it: plans, dataset.json, fold_0 with final/best checkpoints and a log.
    The weights are those of the stock network of the tiny plans (plus one training-only head)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    results = tmp_path / "nnUNet_results" / tiny_dataset.dataset_name
    folder = results / f"nnUNetTrainerMeanTeacher__{tiny_dataset.plans}__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    shutil.copy(os.path.join(tiny_dataset.preprocessed, f"{tiny_dataset.plans}.json"), folder / "plans.json")
    shutil.copy(os.path.join(tiny_dataset.preprocessed, "dataset.json"), folder / "dataset.json")
    pm = PlansManager(str(folder / "plans.json"))
    network = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 2,
                                                       enable_deep_supervision=False)
    weights = dict(network.state_dict())
    weights["heads.projector.weight"] = torch.zeros(2, 2)
    checkpoint = {"network_weights": weights, "trainer_name": "nnUNetTrainerMeanTeacher",
                  "init_args": {"configuration": "3d_fullres"}, "current_epoch": 1, "_best_ema": 0.5,
                  "inference_allowed_mirroring_axes": (0, 1, 2), "semiseg": {"teacher": {}}}
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        torch.save(checkpoint, folder / "fold_0" / name)
    (folder / "fold_0" / "training_log.txt").write_text("epoch 0\n")
    return folder


def _model_intact(folder: Path) -> bool:
    fold = folder / "fold_0"
    return ((fold / "training_log.txt").is_file() and (fold / "checkpoint_best.pth").is_file()
            and torch.load(fold / "checkpoint_final.pth", weights_only=False)["trainer_name"]
            == "nnUNetTrainerMeanTeacher")


def test_export_refuses_output_onto_its_model_or_the_results_folder(trained_model, tmp_path, capsys):
    for output in (trained_model, trained_model.parent, trained_model.parent.parent):
        with pytest.raises(SystemExit) as exit_info:
            export_plain.main(["-i", str(trained_model), "-o", str(output), "--overwrite"])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert str(trained_model) in err and "destroy the input" in err, err
        assert _model_intact(trained_model)
    # An existing folder that is no model is not replaced either (--overwrite replaces model folders only) ...
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(SystemExit):
        export_plain.main(["-i", str(trained_model), "-o", str(other), "--overwrite"])
    assert "not a model folder" in capsys.readouterr().err and (other / "thesis.tex").is_file()
    # ... while an earlier export is.
    plain = tmp_path / "plain"
    export_plain.main(["-i", str(trained_model), "-o", str(plain)])
    export_plain.main(["-i", str(trained_model), "-o", str(plain), "--overwrite"])
    assert torch.load(plain / "fold_0" / "checkpoint_final.pth", weights_only=False)["trainer_name"] == "nnUNetTrainer"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_converter_refuses_output_that_contains_the_input(tmp_path, capsys):
    raw = tmp_path / "raw"
    target = raw / "Dataset101_LA"
    src = make_la_h5(target / "download", ["A", "B"])  # the download sits inside the dataset folder to replace
    (target / "dataset.json").write_text("{}")
    args = ["-i", str(src), "--output", str(raw), "--train-list", str(write_list(tmp_path / "tr.txt", ["A", "B"])),
            "--test-list", str(write_list(tmp_path / "te.txt", [])), "--overwrite"]
    assert la.main(args) == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and str(src) in err, err
    assert (src / "2018LA_Seg_Training Set" / "A" / la.H5_FILE).is_file()
    # A folder that is no raw dataset (no dataset.json) is not replaced by --overwrite.
    shutil.rmtree(target)
    src = make_la_h5(tmp_path / "src", ["A", "B"])
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("x")
    assert la.main(["-i", str(src), *args[2:]]) == 2
    assert "not an nnU-Net raw dataset" in capsys.readouterr().err and (target / "keep.txt").is_file()


# ---------------------------------------------------------------------------------------------------------------
# 2./3. silent corruption of converter inputs: truncated NIfTI, 2D image
def test_converter_rejects_truncated_nifti_and_2d_image(tmp_path, capsys):
    pats = ["patient001", "patient002", "patient003"]
    lists = ["--train-list", str(write_list(tmp_path / "tr.txt", pats[:2])),
             "--test-list", str(write_list(tmp_path / "te.txt", pats[2:])), "--labeled", "1"]
    src = make_acdc_nifti(tmp_path / "acdc", pats)
    bad = src / "training" / "patient002" / "patient002_frame07.nii.gz"
    truncate(bad)
    assert acdc.main(["-i", str(src), "--output", str(tmp_path / "raw"), *lists]) == 2
    err = capsys.readouterr().err
    assert "patient002_frame07" in err and str(bad) in err and "truncated" in err, err
    # LA challenge release: a 2D image is refused by name (it used to end in a ValueError traceback).
    root = tmp_path / "la"
    for k, cid in enumerate(["A", "B"]):
        d = root / "Training Set" / cid
        d.mkdir(parents=True)
        shape = (8, 12, 16) if cid == "A" else (12, 16)
        sitk.WriteImage(sitk.GetImageFromArray(np.ones(shape, np.int16)), str(d / la.RAW_IMAGE_FILE))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(d / la.RAW_LABEL_FILE))
    code = la.main(["-i", str(root), "--output", str(tmp_path / "raw2"), "--train-list",
                    str(write_list(tmp_path / "tr2.txt", ["A", "B"])), "--test-list",
                    str(write_list(tmp_path / "te2.txt", []))])
    assert code == 2
    err = capsys.readouterr().err
    assert "Case B" in err and "2D image" in err, err
    # 3. A spacing 80x off the labeled cases' is converted, with a warning naming the case.
    src = make_acdc_nifti(tmp_path / "acdc80", pats, spacing={"patient003": (120.0, 120.0, 800.0)})
    assert acdc.main(["-i", str(src), "--output", str(tmp_path / "raw3"), *lists]) == 0
    err = capsys.readouterr().err
    assert "WARNING: Case patient003_frame01: spacing (x, y, z) (120.0, 120.0, 800.0) is far" in err, err
    assert "patient001" not in err and "patient002" not in err


# ---------------------------------------------------------------------------------------------------------------
# 5. label values checked as stored
def test_la_float_label_is_an_error_not_background(tmp_path, capsys):
    src = make_la_h5(tmp_path / "src", ["A", "B"], label_dtype=np.float32, label_value=0.5)
    code = la.main(["-i", str(src), "--output", str(tmp_path / "raw"), "--train-list",
                    str(write_list(tmp_path / "tr.txt", ["A", "B"])), "--test-list",
                    str(write_list(tmp_path / "te.txt", []))])
    assert code == 2
    err = capsys.readouterr().err
    assert "Case A" in err and "non-integer values (0.5)" in err, err
    assert not (tmp_path / "raw" / "Dataset101_LA").exists()
    # Float labels holding whole numbers are fine (the value check still applies to them).
    assert common.check_label_values("c", "f", np.array([0.0, 1.0], np.float32), (0, 1)) == [0, 1]
    with pytest.raises(common.ConversionError, match=r"values \[2\]"):
        common.check_label_values("c", "f", np.array([0.0, 2.0], np.float64), (0, 1))


# ---------------------------------------------------------------------------------------------------------------
# 6. misleading scores
def test_evaluate_undefined_label_unknown_values_geometry_and_existing_output(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    seg(ref / "a.nii.gz", cube())
    seg(pred / "a.nii.gz", cube())
    seg(ref / "b.nii.gz", cube())
    seg(pred / "b.nii.gz", cube())
    out = tmp_path / "out.json"
    # Label 2 is in no reference and no prediction: not defined, not 100 %.
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-l", "1", "2", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 2 not defined | n/a |" in printed and "Not defined: 2" in printed, printed
    data = json.loads(out.read_text())
    assert data["mean"]["2"]["dice"] is None and data["undefined_labels"] == ["2"]
    assert data["mean"]["1"]["dice"] == 1.0 and data["foreground_mean"]["dice"] == 1.0

    # A mask saved as 0/255: a warning naming the case; --strict makes it an error (exit 2).
    seg(pred / "b.nii.gz", cube(value=255))
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "WARNING: case b:" in err and "[255]" in err and "0/255" in err, err
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(out), "--strict"]) == 2
    assert "--strict: case b:" in capsys.readouterr().err

    # Same grid size and spacing but another origin / a flipped direction: warning, --strict error.
    seg(pred / "b.nii.gz", cube(), origin=(5.0, 0.0, 0.0))
    seg(pred / "a.nii.gz", cube(), direction=(-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert "case b: origin (5.0, 0.0, 0.0)" in err and "case a: direction (-1.0" in err, err
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(out), "--strict"]) == 2
    capsys.readouterr()

    # An output path that already exists as a folder, or below a file: exit 2 with a message, no traceback.
    (tmp_path / "dir.json").mkdir()
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "dir.json")]) == 2
    assert "dir.json exists and is a folder" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert evaluate_main(["-ref", str(ref), "-pred", str(pred), "-o", str(tmp_path / "afile")]) == 2
    assert "afile exists and is a file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 7. checkpoints that cannot be read name the file
def test_truncated_or_empty_checkpoint_named_for_resume_and_export(trained_model, tmp_path, capsys):
    from nnunetv2_semiseg.trainers.semi_supervised import nnUNetTrainerSemiSupervised
    final = trained_model / "fold_0" / "checkpoint_final.pth"
    truncate(final)
    # --c: nnU-Net's run_training calls trainer.load_checkpoint(<fold>/checkpoint_final.pth).
    stand_in = types.SimpleNamespace(was_initialized=True, device=torch.device("cpu"))
    with pytest.raises(RuntimeError) as error:
        nnUNetTrainerSemiSupervised.load_checkpoint(stand_in, str(final))
    message = str(error.value)
    assert str(final) in message and "checkpoint_best.pth" in message and "without --c" in message, message
    final.write_bytes(b"")
    with pytest.raises(RuntimeError, match="checkpoint_final.pth is truncated, empty or corrupt"):
        nnUNetTrainerSemiSupervised.load_checkpoint(stand_in, str(final))
    # Export: exit 1 with the file and the -chk alternative.
    with pytest.raises(SystemExit):
        export_plain.main(["-i", str(trained_model), "-o", str(tmp_path / "plain")])
    err = capsys.readouterr().err
    assert str(final) in err and "-chk" in err and "Traceback" not in err, err
    assert not (tmp_path / "plain").exists()


# ---------------------------------------------------------------------------------------------------------------
# 9. process counts
def test_process_counts_below_one_are_refused(capsys):
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_info:
            la.build_parser().parse_args(["-i", "x", "-np", bad])
        assert exit_info.value.code == 2
        assert "pass at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# 10. killed run: workers die with it, the next run removes its temporary folder
def _children(pid: int):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]  # a zombie has stopped running


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killed_conversion_leaves_no_worker_and_next_run_cleans_up(tmp_path):
    ids = [f"C{k}" for k in range(4)]
    # Large enough that writing one case takes a worker well over a second (compressed NIfTI).
    src = make_la_h5(tmp_path / "src", ids, shape_xyz=(192, 192, 96), compression=None)
    raw = tmp_path / "raw"
    args = ["-i", str(src), "--output", str(raw), "--train-list", str(write_list(tmp_path / "tr.txt", ids)),
            "--test-list", str(write_list(tmp_path / "te.txt", [])), "-np", "2"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen([sys.executable, "-m", "dataset_conversion.la", *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 60
        while time.time() < deadline and process.poll() is None:
            workers = _children(process.pid)
            if len(workers) >= 2 and any(p.name.startswith(".tmp_") for p in raw.iterdir()):
                break
            time.sleep(0.05)
        assert process.poll() is None and len(workers) >= 2, "the conversion ended before it could be killed"
        time.sleep(0.3)  # the workers are now converting their first cases
        process.send_signal(signal.SIGKILL)
        process.wait()
        time.sleep(0.5)
        assert [w for w in workers if _alive(w)] == []  # no orphan keeps writing
        assert [p.name for p in raw.iterdir() if p.name.startswith(".tmp_")] != []  # the killed run's leftover
    finally:
        for w in workers:  # only the processes this test started
            if _alive(w):
                os.kill(w, signal.SIGKILL)
    assert la.main(args) == 0
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset101_LA"]


# ---------------------------------------------------------------------------------------------------------------
# 11. created folders and files follow the umask
def test_outputs_follow_the_umask(trained_model, tmp_path):
    old = os.umask(0o022)
    try:
        src = make_la_h5(tmp_path / "src", ["A", "B"])
        assert la.main(["-i", str(src), "--output", str(tmp_path / "raw"), "--train-list",
                        str(write_list(tmp_path / "tr.txt", ["A", "B"])), "--test-list",
                        str(write_list(tmp_path / "te.txt", []))]) == 0
        dataset = tmp_path / "raw" / "Dataset101_LA"
        assert oct(dataset.stat().st_mode & 0o777) == oct(0o755)
        assert oct((dataset / "imagesTr").stat().st_mode & 0o777) == oct(0o755)
        export_plain.main(["-i", str(trained_model), "-o", str(tmp_path / "plain")])
        assert oct((tmp_path / "plain").stat().st_mode & 0o777) == oct(0o755)
        labels = dataset / "labelsTr"
        assert evaluate_main(["-ref", str(labels), "-pred", str(labels), "-o", str(tmp_path / "e.json")]) == 0
        assert oct((tmp_path / "e.json").stat().st_mode & 0o777) == oct(0o644)
        assert oct((tmp_path / "e.csv").stat().st_mode & 0o777) == oct(0o644)
    finally:
        os.umask(old)
