"""Export of fine-tuned runs (mim3d.deploy): ONNX and TorchScript for every downstream network,
checked against PyTorch on a real CT patch; the MONAI bundles (segmentation and classification)
run by MONAI itself; prediction through ONNX Runtime; bad exports and foreign ONNX files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from deploy_runs import CT_SMALL, network_run, seg_run

from mim3d.cli import main
from mim3d.data.transforms import make_dataset
from mim3d.deploy.onnx_model import NotAMim3dExport, read_metadata
from mim3d.engine.bundle import CLS_OUTPUT
from mim3d.engine.export import ONNX_OPSET, export_run, tolerance_for
from mim3d.engine.inference import ReadCapture, load_run
from mim3d.engine.predict import predict_volume

onnx = pytest.importorskip("onnx", reason="the deploy extra (onnx, onnxruntime) is needed")
ort = pytest.importorskip("onnxruntime", reason="the deploy extra is needed")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return seg_run(tmp_path_factory)


def _real_patches(run_dir: Path, ct: Path) -> torch.Tensor:
    """Two ROI patches ``(2, 1, *roi)`` of the real CT, preprocessed as the run does."""
    cfg = load_run(run_dir, device="cpu").cfg
    case = {"image": str(ct), **({"label": 0} if cfg.task.task == "cls" else {})}
    image = make_dataset([case], cfg.data, cfg.task, train=False, cache=False,
                         reader=ReadCapture())[0]["image"].as_tensor()
    roi = cfg.task.roi
    starts = [[0, 0, 0], [s - r for s, r in zip(image.shape[1:], roi)]]  # two corners
    return torch.stack([image[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]]
                        for a, b, c in starts])


def _check_exports(run_dir: Path, out: Path, ct: Path) -> None:
    x = _real_patches(run_dir, ct)
    assert float(x.std()) > 0.05  # real anatomy, not padding
    model = load_run(run_dir, device="cpu").model
    with torch.no_grad():
        ref = model(x).numpy()
    tol = tolerance_for(json.loads((run_dir / "finetune.json").read_text())["network"])
    path, meta = export_run(run_dir, out / "m.onnx", fmt="onnx")
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    assert proto.opset_import[0].version == ONNX_OPSET
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, **tol)  # batch 2: the batch axis is dynamic
    assert meta["check"]["passed"] and read_metadata(path)["spec"]["network"] == \
        json.loads((run_dir / "finetune.json").read_text())["network"]
    ts_path, _ = export_run(run_dir, out / "m.ts", fmt="torchscript")
    extra = {"mim3d.json": ""}
    traced = torch.jit.load(str(ts_path), _extra_files=extra)
    np.testing.assert_allclose(traced(x).detach().numpy(), ref, **tol)
    assert json.loads(extra["mim3d.json"])["weights_sha256"] == meta["weights_sha256"]


@pytest.mark.parametrize("network", ["mim-unetr", "unetr", "classifier"])
def test_onnx_and_torchscript_match_pytorch_on_a_real_ct_patch(
        network: str, run: Path, shared_data: Path, tmp_path: Path) -> None:
    source = run if network == "mim-unetr" else network_run(run, tmp_path / "run", network,
                                                            (32, 32, 32))
    _check_exports(source, tmp_path, shared_data / CT_SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("network, roi, lora", [("swinunetr", (64, 64, 64), None),
                                                ("mim-unetr", (32, 32, 32), 4)])
def test_swinunetr_and_lora_runs_export_too(network: str, roi: tuple[int, int, int],
                                            lora: int | None, run: Path, shared_data: Path,
                                            tmp_path: Path) -> None:
    source = network_run(run, tmp_path / "run", network, roi, lora_rank=lora)
    _check_exports(source, tmp_path, shared_data / CT_SMALL)
    if lora:  # the adapters are merged into plain layers: no peft module in the graph
        names = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
        assert "MatMul" in names and not any("lora" in n.name.lower()
                                             for n in onnx.load(str(tmp_path / "m.onnx"))
                                             .graph.initializer)


def test_predict_through_onnx_runtime_matches_the_run(run: Path, shared_data: Path,
                                                      tmp_path: Path) -> None:
    model = export_run(run, tmp_path / "model.onnx", fmt="onnx")[0]
    ct = shared_data / CT_SMALL
    ours = predict_volume(run, ct, tmp_path / "torch.nii.gz")[0]
    theirs, side = predict_volume(model, ct, tmp_path / "onnx.nii.gz", device="cpu")
    a, b = (np.asarray(nib.load(str(p)).dataobj) for p in (ours, theirs))
    assert a.shape == b.shape == nib.load(str(ct)).shape
    assert (a == b).mean() >= 0.999 and len(np.unique(a)) > 1
    info = json.loads(side.read_text())["model"]
    assert info["runtime"] == "onnxruntime" and info["run"] == str(model.resolve())


def test_foreign_onnx_and_existing_outputs_are_refused(run: Path, shared_data: Path,
                                                       tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), str(foreign), dynamo=False)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    for bad in (foreign, garbage):
        with pytest.raises(NotAMim3dExport, match="mim3d export"):
            read_metadata(bad)
        code = main(["predict", "-i", str(shared_data / CT_SMALL), "-o",
                     str(tmp_path / "x.nii.gz"), "--model", str(bad)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err
        assert "not a mim3d export" in err or "not a readable ONNX file" in err
    assert not (tmp_path / "x.nii.gz").exists()
    taken = tmp_path / "taken.onnx"
    taken.write_text("keep me")
    assert main(["export", str(run), "--format", "onnx", "--out", str(taken)]) == 2
    assert "exists" in capsys.readouterr().err and taken.read_text() == "keep me"


def _run_bundle(bundle: Path, ct: Path, out: Path) -> None:
    """``python -m monai.bundle run`` in the bundle folder, in its own process group."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           "configs/inference.json", "--image", str(ct), "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]


@pytest.mark.slow
def test_monai_bundle_runs_in_monai_and_matches_predict(run: Path, shared_data: Path,
                                                        tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", str(run), "--format", "bundle", "--out", str(bundle)]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "background", "1": "spleen", "6": "liver"}
    assert meta["mim3d"]["preprocessing"]["spacing_mm"] == [4.5, 4.5, 4.5]
    assert (bundle / "models" / "model.ts").is_file()
    ct = shared_data / CT_SMALL
    _run_bundle(bundle, ct, tmp_path / "out")
    (written,) = (tmp_path / "out").glob("*_seg.nii.gz")
    ours = predict_volume(run, ct, tmp_path / "ours.nii.gz")[0]
    a, b = (nib.load(str(p)) for p in (ours, written))
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    agree = (np.asarray(a.dataobj) == np.asarray(b.dataobj)).mean()
    assert agree >= 0.999 and len(np.unique(np.asarray(b.dataobj))) > 1


@pytest.mark.slow
def test_classifier_bundle_runs_in_monai_and_matches_evaluate(run: Path, shared_data: Path,
                                                             tmp_path: Path) -> None:
    source = network_run(run, tmp_path / "cls_run", "classifier", (32, 32, 32))
    bundle, ct = tmp_path / "bundle", shared_data / CT_SMALL
    assert main(["export", str(source), "--format", "bundle", "--out", str(bundle)]) == 0
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    classes = json.loads((source / "finetune.json").read_text())["classes"]
    assert pred["channel_def"] == classes == {"0": "no", "1": "yes"}
    assert (pred["type"], pred["format"], pred["num_channels"]) == ("probabilities",
                                                                   "classes", 2)
    assert meta["task"] == "CT classification: no, yes"
    _run_bundle(bundle, ct, tmp_path / "out")
    rows = (tmp_path / "out" / CLS_OUTPUT).read_text().splitlines()
    assert len(rows) == 1 and rows[0].split(",")[0] == str(ct)
    theirs = np.asarray([float(v) for v in rows[0].split(",")[1:]])
    datalist = tmp_path / "one.json"
    datalist.write_text(json.dumps({"training": [], "validation": [{"image": str(ct),
                                                                    "label": 1}]}))
    assert main(["evaluate", str(source), "--data", str(datalist), "--out",
                 str(tmp_path / "metrics.json"), "--device", "cpu"]) == 0
    (case,) = json.loads((tmp_path / "metrics.json").read_text())["per_case"].values()
    ours = np.asarray(case["probs"])
    # The same float32 network (traced vs eager) on the same ROI; only float32 rounding may
    # differ (SciPy vs Spacingd resampling, summation order): they agreed exactly when this was
    # written. 1e-5 allows that rounding and is far below a real pipeline difference: a 4 mm
    # instead of the run's 4.5 mm spacing moved these untrained probabilities by 8e-4.
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    assert int(theirs.argmax()) == case["pred"] and abs(ours[0] - ours[1]) > 1e-3
