"""Tests of downstream fine-tuning, evaluation and prediction (mim3d.engine.finetune, .predict,
.downstream_run) on tiny phantoms, plus the real-CT DICOM grid check and a slow real-CT run."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from nibabel import orientations as ornt

from mim3d.config import ConfigError, load_config, to_dict
from mim3d.data.phantom import write_cohort
from mim3d.data.transforms import remap_labels
from mim3d.data.volume import ImageReadError
from mim3d.engine import finetune as ft_module
from mim3d.engine.checkpoint import save_checkpoint
from mim3d.engine.downstream_run import build_network, split_cases
from mim3d.engine.finetune import finetune
from mim3d.engine.optim import warmup_cosine
from mim3d.engine.predict import evaluate_run, load_run, predict_volume
from mim3d.factory import build_mim
from mim3d.metrics import dice
from mim3d.transfer import TransferError, export_encoder

# Tiny and quick: 40^3 phantoms at 4 mm, 16^3 crops, the tiny encoder; the btcv preset otherwise.
FAST = ("optim.total_steps=6", "optim.warmup_steps=1", "optim.lr=1e-3", "task.roi=[16,16,16]",
        "data.spacing=[4,4,4]", "task.sw_overlap=0.25", "task.num_samples=1", "train.workers=0",
        "train.log_every=1", "train.ckpt_every=3")
LABELS = {"0": "background", "1": "spleen", "6": "liver"}


def _cfg(*extra: str, preset: str = "btcv") -> object:
    return load_config("downstream", preset, overrides=[*FAST, *extra])


def _run(cfg: object, data: Path, out: Path, **kw: object) -> object:
    kw = {"size": "tiny", "val_every": 100, "progress": False, **kw}
    return finetune(cfg, data=data, out=out, **kw)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 phantoms (2 training, 1 validation) and a datalist naming two classes: spleen 1, liver 6."""
    root = tmp_path_factory.mktemp("cohort")
    raw = json.loads(write_cohort(root, 3, seed=0, shape=(40, 40, 40),
                                  spacing=(4.0, 4.0, 4.0)).read_text())
    raw["labels"] = LABELS
    path = root / "datalist.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture(scope="module")
def seg_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    return _run(_cfg(), cohort, tmp_path_factory.mktemp("seg") / "run", val_every=3)


def _encoder(root: Path, *overrides: str) -> Path:
    cfg = load_config("pretrain", "tiny", overrides=overrides)
    save_checkpoint(root / "pre", step=1, model=build_mim(cfg), config=to_dict(cfg))
    return export_encoder(root / "pre", root / "encoder.safetensors")[0]


# ------------------------------------------------------------------------------ splits


def test_split_fractions_are_nested_and_folds_disjoint() -> None:
    names = [f"case{i:02d}" for i in range(20)]
    by_f = {f: split_cases(names, seed=3, folds=5, fold=1, label_fraction=f)
            for f in (0.25, 0.5, 1.0)}
    assert [len(by_f[f].train) for f in (0.25, 0.5, 1.0)] == [4, 8, 16]
    assert set(by_f[0.25].train) < set(by_f[0.5].train) < set(by_f[1.0].train)
    assert set(by_f[1.0].train) == set(by_f[1.0].train_all)
    vals = [set(split_cases(names, seed=3, folds=5, fold=k).validation) for k in range(5)]
    assert all(len(v) == 4 for v in vals) and set().union(*vals) == set(names)
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
    assert not vals[1] & set(by_f[1.0].train)
    assert split_cases(names, seed=3, fold=1) == by_f[1.0]
    assert split_cases(names, seed=4, fold=1).validation != by_f[1.0].validation
    given = split_cases(names[:3], seed=0, validation=["v"], label_fraction=0.5)
    assert given.source == "datalist-validation" and given.validation == ["v"]
    assert len(given.train) == 2
    with pytest.raises(ValueError, match="label-fraction"):
        split_cases(names, seed=0, label_fraction=0.0)
    with pytest.raises(ValueError, match="fold"):
        split_cases(names, seed=0, folds=5, fold=5)


# ------------------------------------------------------------------------------ fine-tuning


def test_finetune_writes_splits_spec_metrics_and_checkpoints(seg_run: object) -> None:
    run = seg_run.run_dir
    spec = json.loads((run / "finetune.json").read_text())
    assert spec["classes"] == {"1": "spleen", "6": "liver"} and spec["num_classes"] == 7
    assert (spec["network"], spec["size"], spec["task"]) == ("mim-unetr", "tiny", "seg")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["task"]["labels"] == {1: "spleen", 6: "liver"} and cfg["task"]["num_classes"] == 7
    splits = json.loads((run / "splits.json").read_text())
    assert splits["source"] == "datalist-validation"
    assert sorted(splits["train"]) == ["phantom_000", "phantom_001"]
    assert splits["validation"] == ["phantom_002"]
    records = _jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    vals = {r["step"]: r["val_dice"] for r in records if "val_dice" in r}
    assert sorted(vals) == [3, 6] and all(0.0 <= v <= 1.0 for v in vals.values())
    best = json.loads((run / "best" / "best.json").read_text())
    assert best["score"] == max(vals.values()) == seg_run.best_score
    assert seg_run.best_checkpoint == run / "best" / f"ckpt_{best['step']:08d}"
    assert seg_run.last_checkpoint == run / "ckpt_00000006" and seg_run.step == 6


def test_resume_continues_the_run_with_its_own_config(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run(_cfg(), cohort, out, max_steps=2).step == 2
    with pytest.raises(ConfigError, match="--resume"):
        _run(_cfg(), cohort, out)
    # A different lr on the command line is ignored: the run keeps its saved config.
    result = _run(_cfg("optim.lr=5.0"), cohort, out, max_steps=4, resume=True,
                  label_fraction=0.5)  # also ignored: the run's recorded splits are kept
    assert result.step == 4 and result.last_checkpoint.name == "ckpt_00000004"
    records = [r for r in _jsonl(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    want = warmup_cosine(2, base_lr=1e-3, warmup_steps=1, total_steps=6)  # step 3 = index 2
    assert records[2]["lr"] == pytest.approx(want)


def test_sigterm_checkpoints_logs_and_returns_the_signal(cohort: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    original = ft_module._Run.train_step

    def step_then_signal(self: object, step: int, batches: object) -> object:
        out = original(self, step, batches)
        signal.raise_signal(signal.SIGTERM)  # as a cluster's preemption notice would arrive
        return out

    monkeypatch.setattr(ft_module._Run, "train_step", step_then_signal)
    result = _run(_cfg("train.log_every=1000"), cohort, tmp_path / "run")
    assert result.stopped_by_signal and result.stop_signal == signal.SIGTERM
    assert result.step == 1 and result.last_checkpoint == tmp_path / "run" / "ckpt_00000001"
    assert [r["step"] for r in _jsonl(result.metrics)] == [1]  # the stopped step is logged


# ------------------------------------------------------------------------------ classes, memory


def test_datalist_labels_and_preset_aliases_are_reconciled(cohort: Path) -> None:
    """``mim3d phantoms`` labels name raw ids; study-phantom's aliases (4 -> 0, 6 -> 4) apply
    to them, so liver is class 4 *named liver* and gallbladder drops out."""
    from mim3d.data.phantom import LABELS as PHANTOM
    from mim3d.engine.downstream_run import resolve_task

    task = _cfg(preset="study-phantom").task
    got = resolve_task(task, dict(PHANTOM))
    assert got.labels[4] == "liver" and "gallbladder" not in got.labels.values()
    assert got.labels[1] == "spleen" and 6 not in got.labels and got.num_classes == 18
    raw = json.loads(cohort.read_text())["training"][0]["label"]
    label = np.asarray(nib.load(str(cohort.parent / raw)).dataobj)
    mapped = remap_labels(label, got.labels, aliases=got.label_aliases)
    assert (mapped[label == 6] == 4).all() and (mapped[label == 4] == 0).all()
    assert (mapped[label == 1] == 1).all()
    scored = resolve_task(task, {0: "bg", 1: "spleen", 2: "right_kidney", 3: "left_kidney",
                                 6: "liver"})
    assert scored.labels == {1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "liver"}
    # a datalist naming class ids instead of raw ids clashes with the aliases: named both
    with pytest.raises(ValueError, match=r"label clash: the preset's task.labels name class 4 "
                                         r"'liver'.*give class 4 no name \(raw id 6"):
        resolve_task(task, {1: "spleen", 4: "liver"})
    with pytest.raises(ValueError, match=r"raw ids 4 \('gallbladder'\) and 6 \('liver'\)"):
        resolve_task(replace(task, label_aliases={6: 4}), dict(PHANTOM))


def test_memory_estimate_and_refusal(cohort: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from mim3d.engine import runtime
    from mim3d.factory import build_downstream

    # hand count: conv input 8^3 fp32 (2048 B) + its weight 2*27 (216 B) + ReLU output (4096 B)
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU())
    assert runtime.saved_activation_bytes(net, (1, 1, 8, 8, 8)) == 2048 + 216 + 4096
    # the cc-ccii preset (384x384x32): one sample fits a 24 GiB machine, four at once do not
    cls = build_downstream(network="classifier", size="tiny", in_channels=1, out_channels=3,
                           roi=(384, 384, 32))
    one = runtime.estimate_step_bytes(cls, (1, 1, 384, 384, 32), "fp32")
    assert 8 * 2**30 < one < 20 * 2**30
    assert runtime.estimate_step_bytes(cls, (4, 1, 384, 384, 32), "fp32") > 24 * 2**30
    ccii = load_config("downstream", "cc-ccii").optim
    assert (ccii.batch_size, ccii.accum_steps) == (1, 4)  # the effective batch stays 4
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 2**20)
    with pytest.raises(runtime.MemoryEstimateError, match=r"needs about .* GiB, but 0\.0 GiB "
                                                          r"are available.*optim\.batch_size"):
        _run(_cfg(), cohort, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_lora_run_with_a_pretrained_encoder(cohort: Path, tmp_path: Path) -> None:
    encoder = _encoder(tmp_path)
    out = tmp_path / "run"
    _run(_cfg(), cohort, out, max_steps=1, pretrained=encoder, lora_rank=4)
    transfer = json.loads((out / "transfer_report.json").read_text())
    assert transfer["loaded"] and all(k.startswith("encoder.") for k in transfer["loaded"])
    assert not [k for k in transfer["missing"] if k.startswith("encoder.")]
    spec = json.loads((out / "finetune.json").read_text())
    assert spec["pretrained"] == str(encoder.resolve()) and spec["lora_rank"] == 4
    assert 0.0 < spec["lora"]["trainable_share"] < 1.0 and spec["lora"]["targeted_modules"]
    loaded = load_run(out, checkpoint="last")  # LoRA layout rebuilt, weights load strictly
    assert loaded.checkpoint.name == "ckpt_00000001"


def test_vit_encoder_into_mim_unetr_is_refused(cohort: Path, tmp_path: Path) -> None:
    vit = _encoder(tmp_path, "model.encoder=vit")
    out = tmp_path / "run"
    with pytest.raises(TransferError, match="vit encoder") as err:
        _run(_cfg(), cohort, out, pretrained=vit)
    assert "\n" not in str(err.value) and not out.exists()


def test_label_off_its_image_grid_is_refused(cohort: Path, tmp_path: Path) -> None:
    raw = json.loads(cohort.read_text())
    label = nib.load(str(cohort.parent / raw["training"][0]["label"]))
    shifted = label.affine.copy()
    shifted[:3, 3] += 4.0  # same shape, one voxel off
    bad = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), str(bad))
    raw["training"][0]["label"] = str(bad)
    data = tmp_path / "datalist.json"
    data.write_text(json.dumps({**raw, "base_dir": str(cohort.parent)}))
    with pytest.raises(ImageReadError, match="does not lie on the image grid"):
        _run(_cfg(), data, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unknown_class_id_is_refused(cohort: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown class id 20"):
        _run(_cfg("task.label_aliases={7: 20}"), cohort, tmp_path / "a")
    raw = json.loads(cohort.read_text())
    entries = [{"image": e["image"], "label": i} for i, e in enumerate(raw["training"])]
    entries[-1]["label"] = 3
    data = cohort.parent / "cls_bad.json"
    data.write_text(json.dumps({"labels": {"0": "no", "1": "yes"}, "training": entries}))
    with pytest.raises(ValueError, match="unknown class id 3"):
        _run(_cfg(preset="cc-ccii"), data, tmp_path / "b", network="classifier")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_classification_run_and_evaluation(cohort: Path, tmp_path: Path) -> None:
    raw = json.loads(cohort.read_text())
    entries = [{"image": e["image"], "label": i % 2}
               for i, e in enumerate(raw["training"] + raw["validation"])]
    data = cohort.parent / "cls.json"
    data.write_text(json.dumps({"labels": {"0": "no", "1": "yes"}, "training": entries[:1],
                                "validation": entries[1:]}))
    out = tmp_path / "run"
    result = _run(_cfg("data.spacing=null", preset="cc-ccii"), data, out, network="classifier",
                  max_steps=2)
    assert result.best_score in (0.0, 0.5, 1.0)
    report, table = evaluate_run(out, data=data, out_json=tmp_path / "m.json", progress=False)
    summary = json.loads(report.read_text())["summary"]
    assert 0.0 <= summary["accuracy"] <= 1.0 and 0.0 <= summary["auc"] <= 1.0
    assert table.read_text().splitlines()[0] == "case,label,pred,p_no,p_yes"


# ------------------------------------------------------------------------------ evaluate, predict


def test_evaluate_writes_per_class_metrics_on_the_original_grid(seg_run: object, cohort: Path,
                                                                 tmp_path: Path) -> None:
    report, table = evaluate_run(seg_run.run_dir, data=cohort, out_json=tmp_path / "m.json",
                                 progress=False)
    doc = json.loads(report.read_text())
    assert doc["cases_from"] == "datalist validation list" and list(doc["per_case"]) == [
        "phantom_002"]
    assert set(doc["summary"]["classes"]) == {"spleen", "liver"}
    for entry in doc["summary"]["classes"].values():
        assert set(entry) >= {"dice", "nsd", "hd95", "n_absent", "n_hd95_undefined"}
    assert doc["rules"]["nsd_tolerance_mm"] == 1.0 and "absent" in doc["rules"]["absent_class"]
    rows = table.read_text().splitlines()
    assert rows[0] == "case,class,dice,nsd,hd95" and len(rows) == 3
    # The reported Dice is that of the written prediction against the label file.
    pred_path, _ = predict_volume(seg_run.run_dir, cohort.parent / "imagesTr/phantom_002.nii.gz",
                                  tmp_path / "p.nii.gz")
    pred = np.asarray(nib.load(str(pred_path)).dataobj)
    gt = remap_labels(np.asarray(nib.load(str(cohort.parent / "labelsTr/phantom_002.nii.gz"))
                                 .dataobj), [1, 6])
    got = doc["per_case"]["phantom_002"]["liver"]["dice"]
    assert got == pytest.approx(dice(pred, gt, 6))
    folder = evaluate_run(seg_run.run_dir, data=cohort.parent, out_json=tmp_path / "f.json",
                          progress=False)[0]
    assert len(json.loads(folder.read_text())["per_case"]) == 3  # every case of the folder


@pytest.mark.parametrize("axcodes", ["LPS", "PIR"])
def test_predict_maps_back_to_the_input_grid(seg_run: object, cohort: Path, tmp_path: Path,
                                             axcodes: str) -> None:
    ras = nib.load(str(cohort.parent / "imagesTr" / "phantom_002.nii.gz"))
    array = np.asarray(ras.dataobj)[:, :, 4:]  # not a cube: axis swaps must show
    affine = ras.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 4], [0, 0, 0, 1.0]])
    transform = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(axcodes)))
    moved = ornt.apply_orientation(array, transform)
    moved_affine = affine @ ornt.inv_ornt_aff(transform, array.shape)
    nib.save(nib.Nifti1Image(array, affine), str(tmp_path / "ras.nii.gz"))
    nib.save(nib.Nifti1Image(moved, moved_affine), str(tmp_path / "in.nii.gz"))
    out, side = predict_volume(seg_run.run_dir, tmp_path / "in.nii.gz", tmp_path / "out.nii.gz")
    written = nib.load(str(out))
    assert nib.aff2axcodes(written.affine) == tuple(axcodes)
    assert written.shape == moved.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, moved_affine, atol=1e-5)
    reference = predict_volume(seg_run.run_dir, tmp_path / "ras.nii.gz", tmp_path / "r.nii.gz")[0]
    expected = ornt.apply_orientation(np.asarray(nib.load(str(reference)).dataobj), transform)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    info = json.loads(side.read_text())
    assert side.name == "out.json" and info["labels"] == LABELS
    assert info["input"]["orientation"] == axcodes and info["model"]["network"] == "mim-unetr"


def test_predict_dicom_series_on_its_own_grid(seg_run: object, shared_data: Path,
                                              tmp_path: Path) -> None:
    series = shared_data / "ct" / "totalseg_example_ct_dicom"
    out, side = predict_volume(seg_run.run_dir, series, tmp_path / "labels.nii.gz")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series)))
    ref, got = reader.Execute(), sitk.ReadImage(str(out))
    assert got.GetSize() == ref.GetSize() == (512, 512, 20)
    for attr in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(got, attr)(), getattr(ref, attr)(), atol=1e-3)
    assert json.loads(side.read_text())["input"]["format"] == "dicom"


def test_predict_dicom_folder_without_ct_is_refused(seg_run: object, shared_data: Path,
                                                    tmp_path: Path) -> None:
    import pydicom

    folder = tmp_path / "mr"
    folder.mkdir()
    for src in sorted((shared_data / "ct" / "totalseg_example_ct_dicom").iterdir())[:3]:
        ds = pydicom.dcmread(str(src))
        ds.Modality = "MR"
        ds.save_as(str(folder / src.name))
    with pytest.raises(ImageReadError, match="no CT series"):
        predict_volume(seg_run.run_dir, folder, tmp_path / "x.nii.gz")
    assert not (tmp_path / "x.nii.gz").exists()


# ------------------------------------------------------------------------------ real CT (slow)


@pytest.mark.slow
def test_real_ct_liver_dice_clearly_beats_an_untrained_network(shared_data: Path,
                                                               tmp_path: Path) -> None:
    """Same-case sanity check: there is one labelled abdominal CT, so the network is trained and
    scored on it (TotalSegmentator's labels; spleen 1, kidneys 2/3, liver 5 kept as ids)."""
    ct = shared_data / "ct"
    case = {"image": str(ct / "totalseg_example_ct.nii.gz"),
            "label": str(ct / "totalseg_example_ct_seg_fast.nii.gz")}
    data = tmp_path / "datalist.json"
    data.write_text(json.dumps({"labels": {"0": "background", "1": "spleen", "2": "kidney_right",
                                           "3": "kidney_left", "5": "liver"},
                                "training": [case], "validation": [case]}))
    cfg = load_config("downstream", "btcv", overrides=[
        "data.spacing=[3,3,3]", "task.roi=[32,32,32]", "task.num_samples=2", "optim.lr=2e-3",
        "optim.warmup_steps=10", "optim.total_steps=160", "train.workers=0",
        "train.ckpt_every=1000"])  # native 3 mm; about a minute on 2 idle cores
    result = finetune(cfg, data=data, out=tmp_path / "run", size="tiny", val_every=160,
                      progress=False)
    trained = evaluate_run(result.run_dir, data=data, out_json=tmp_path / "trained.json",
                           progress=False)[0]
    # The untrained baseline: the same network and seed, saved before any step.
    untrained = tmp_path / "untrained"
    untrained.mkdir()
    for name in ("finetune.json", "config.yaml"):
        shutil.copy(result.run_dir / name, untrained / name)
    spec = json.loads((untrained / "finetune.json").read_text())
    import torch

    torch.manual_seed(0)  # train.seed: the initialisation the run started from
    save_checkpoint(untrained / "best", step=0, model=build_network(spec))
    baseline = evaluate_run(untrained, data=data, out_json=tmp_path / "untrained.json",
                            progress=False)[0]
    liver = [json.loads(p.read_text())["per_case"]["totalseg_example_ct"]["liver"]["dice"]
             for p in (trained, baseline)]
    print(f"liver Dice: trained {liver[0]:.3f}, untrained {liver[1]:.3f}")
    assert liver[0] > liver[1] + 0.3 and liver[0] > 0.5
