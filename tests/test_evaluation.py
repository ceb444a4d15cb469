"""Tests of mim3d.metrics and mim3d.evaluation: metrics against MONAI and by hand, AUC, reports,
sliding window."""

from __future__ import annotations

import csv
import itertools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_hausdorff_distance, compute_surface_dice
from torch import Tensor, nn

from mim3d import evaluation as ev
from mim3d import metrics as mt

SHAPE = (32, 32, 32)
K = 5  # background + 4 classes
ANISO = (0.8, 1.0, 2.5)


# ---------------------------------------------------------------- helpers


def _ball(center: tuple[float, float, float], radius: float,
          shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """(X, Y, Z) bool ball."""
    grid = np.indices(shape, dtype=np.float64)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, center))
    return dist2 <= radius**2


def _blobs(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A (gt, pred) pair of label maps with spheres of classes 1..4 and a perturbed copy.

    Class 4 is in gt only for odd seeds (missed) and in pred only for even seeds (false
    positive), so the MONAI comparisons cover the one-sided cases too; some spheres touch the
    image border.
    """
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(SHAPE, np.int64), np.zeros(SHAPE, np.int64)
    for cls in range(1, 4):
        for _ in range(rng.integers(1, 3)):
            c = rng.uniform(2, 30, size=3)
            r = rng.uniform(3, 8)
            gt[_ball(tuple(c), r)] = cls
            pred[_ball(tuple(c + rng.integers(-2, 3, size=3)), r + rng.uniform(-1.5, 1.5))] = cls
    extra = _ball(tuple(rng.uniform(6, 26, size=3)), 4.0)
    (gt if seed % 2 else pred)[extra] = 4
    return gt, pred


def _onehot(labels: np.ndarray, k: int = K) -> Tensor:
    """(X, Y, Z) labels -> (1, K, X, Y, Z) float one-hot."""
    t = torch.nn.functional.one_hot(torch.as_tensor(labels).long(), k)
    return t.permute(3, 0, 1, 2)[None].float()


def _ours(fn, pred: np.ndarray, gt: np.ndarray, *args) -> np.ndarray:
    """Our metric for classes 1..K-1 as a vector."""
    return np.array([fn(pred, gt, c, *args) for c in range(1, K)])


# ---------------------------------------------------------------- agreement with MONAI


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_dice_matches_monai(seed: int) -> None:
    gt, pred = _blobs(seed)
    ours = _ours(mt.dice, pred, gt)
    for ignore_empty in (True, False):
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=ignore_empty)
        monai = metric(_onehot(pred), _onehot(gt))[0].numpy()
        # MONAI departs from our rule only where gt lacks the class (see the module docstring).
        present = (gt[None] == np.arange(1, K)[:, None, None, None]).any(axis=(1, 2, 3))
        np.testing.assert_allclose(ours[present], monai[present], rtol=1e-6)
    assert np.isfinite(ours).all()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
@pytest.mark.parametrize("tol", [0.0, 1.0, 1.6, 2.5])
def test_nsd_matches_monai(seed: int, spacing: tuple[float, ...], tol: float) -> None:
    # 1.6 = 2 x 0.8 and 2.5 = the z spacing make many distances tie with the tolerance.
    gt, pred = _blobs(seed)
    ours = _ours(mt.surface_dice, pred, gt, spacing, tol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about the empty class
        monai = compute_surface_dice(_onehot(pred), _onehot(gt), class_thresholds=[tol] * (K - 1),
                                     spacing=list(spacing))[0].numpy()
    np.testing.assert_allclose(ours, monai, rtol=1e-6, atol=0)


def test_nsd_tolerance_tie_in_float32_like_monai() -> None:
    # 3 x 0.1 mm is 0.30000000000000004 in float64: a float64 comparison would drop many
    # surface voxels that lie exactly at the 0.3 mm tolerance; MONAI compares in float32.
    gt = _ball((16, 16, 16), 8).astype(np.int64)
    pred = np.roll(gt, 3, axis=0)
    spacing = [0.1, 0.1, 0.1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a MONAI-internal FutureWarning
        monai = compute_surface_dice(_onehot(pred, 2), _onehot(gt, 2), class_thresholds=[0.3],
                                     spacing=spacing)[0, 0].item()
    assert mt.surface_dice(pred, gt, 1, spacing, 0.3) == monai == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
def test_hd95_matches_monai(seed: int, spacing: tuple[float, ...]) -> None:
    gt, pred = _blobs(seed)
    ours = _ours(mt.hd95, pred, gt, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monai = compute_hausdorff_distance(_onehot(pred), _onehot(gt), percentile=95,
                                           spacing=list(spacing))[0].numpy()
    # MONAI's float32 torch.quantile against our float64 np.percentile.
    np.testing.assert_allclose(ours, monai, rtol=1e-5, atol=1e-5)
    assert np.isnan(ours[-1])  # class 4 is one-sided in every seed


def test_evaluate_case_matches_single_metrics() -> None:
    gt, pred = _blobs(5)
    res = mt.evaluate_case(pred, gt, spacing=ANISO, class_ids=[1, 2, 3, 4],
                           class_names=["a", "b", "c", "d"], nsd_tolerance_mm=2.0)
    assert list(res) == ["a", "b", "c", "d"]
    for cid, name in enumerate(["a", "b", "c", "d"], start=1):
        np.testing.assert_equal(res[name]["dice"], mt.dice(pred, gt, cid))
        np.testing.assert_equal(res[name]["nsd"], mt.surface_dice(pred, gt, cid, ANISO, 2.0))
        np.testing.assert_equal(res[name]["hd95"], mt.hd95(pred, gt, cid, ANISO))


# ---------------------------------------------------------------- hand-computed cases


def test_identical_masks() -> None:
    gt = _ball((16, 16, 16), 7).astype(np.int64)
    assert mt.dice(gt, gt, 1) == 1.0
    assert mt.surface_dice(gt, gt, 1, ANISO, 0.0) == 1.0
    assert mt.hd95(gt, gt, 1, ANISO) == 0.0


def test_dice_of_two_boxes() -> None:
    gt, pred = np.zeros(SHAPE, int), np.zeros(SHAPE, int)
    gt[0:10, 0:10, 0:10] = 2  # 1000 voxels
    pred[5:15, 0:10, 0:10] = 2  # 1000 voxels, 500 shared
    assert mt.dice(pred, gt, 2) == pytest.approx(0.5)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), ANISO])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_sphere(spacing: tuple[float, ...], k: int) -> None:
    gt = _ball((16, 16, 16), 8).astype(np.int64)
    pred = np.roll(gt, k, axis=0)  # exact shift: every surface voxel moves by k * spacing[0]
    shift_mm = k * spacing[0]
    assert abs(mt.hd95(pred, gt, 1, spacing) - shift_mm) <= spacing[0]
    # No surface voxel is farther than the shift from the other surface, and some are that far.
    assert mt.surface_dice(pred, gt, 1, spacing, shift_mm) == 1.0
    assert mt.surface_dice(pred, gt, 1, spacing, 0.99 * shift_mm) < 1.0


def test_surface_is_six_connected_shell() -> None:
    # A 3^3 cube: erosion with the 6-connected element leaves only the centre voxel inside.
    mask = np.zeros((5, 5, 5), bool)
    mask[1:4, 1:4, 1:4] = True
    assert mt._surface(mask).sum() == 26
    # Voxels on the image border are surface (the outside counts as background).
    assert mt._surface(np.ones((3, 3, 3), bool)).sum() == 26


def test_absent_class_rules() -> None:
    gt, pred = np.zeros(SHAPE, int), np.zeros(SHAPE, int)
    gt[_ball((10, 10, 10), 4)] = 1  # class 1: missed
    pred[_ball((20, 20, 20), 4)] = 2  # class 2: false positive; class 3: absent from both
    res = mt.evaluate_case(pred, gt, spacing=(1, 1, 1), class_ids=[1, 2, 3],
                           class_names=["miss", "fp", "none"], nsd_tolerance_mm=1.0)
    for name in ("miss", "fp"):
        assert res[name]["dice"] == 0.0 and res[name]["nsd"] == 0.0
        assert math.isnan(res[name]["hd95"])
    assert all(math.isnan(v) for v in res["none"].values())
    summary = ev.summarize({"case": res})
    assert summary["classes"]["none"]["n_absent"] == 1
    assert summary["classes"]["miss"]["n_hd95_undefined"] == 1
    assert summary["classes"]["fp"]["dice"] == {"mean": 0.0, "std": 0.0, "n": 1}
    assert summary["classes"]["fp"]["hd95"]["n"] == 0


def test_input_checks() -> None:
    a = np.zeros(SHAPE, int)
    with pytest.raises(ValueError, match="same shape"):
        mt.dice(a, a[:-1], 1)
    with pytest.raises(ValueError, match="spacing"):
        mt.hd95(a + 1, a + 1, 1, (1.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        mt.surface_dice(a, a, 1, (1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="class_names"):
        mt.evaluate_case(a, a, spacing=(1, 1, 1), class_ids=[1, 2], class_names=["x"],
                         nsd_tolerance_mm=1.0)


# ---------------------------------------------------------------- summaries and reports


def _per_case() -> dict[str, dict[str, dict[str, float]]]:
    nan = math.nan
    return {
        "c1": {"liver": {"dice": 0.9, "nsd": 0.8, "hd95": 2.0},
               "tumour": {"dice": 0.5, "nsd": 0.4, "hd95": 10.0}},
        "c2": {"liver": {"dice": 0.7, "nsd": 0.6, "hd95": 4.0},
               "tumour": {"dice": nan, "nsd": nan, "hd95": nan}},
        "c3": {"liver": {"dice": 0.8, "nsd": 1.0, "hd95": 3.0},
               "tumour": {"dice": 0.0, "nsd": 0.0, "hd95": nan}},
    }


def test_summarize_by_hand() -> None:
    s = ev.summarize(_per_case())
    assert s["n_cases"] == 3
    liver, tumour = s["classes"]["liver"], s["classes"]["tumour"]
    assert liver["dice"]["mean"] == pytest.approx(0.8)
    assert liver["dice"]["std"] == pytest.approx(math.sqrt((0.01 + 0 + 0.01) / 3))
    assert liver["hd95"] == {"mean": pytest.approx(3.0), "std": pytest.approx(math.sqrt(2 / 3)),
                             "n": 3}
    assert tumour["dice"] == {"mean": pytest.approx(0.25), "std": pytest.approx(0.25), "n": 2}
    assert tumour["hd95"] == {"mean": 10.0, "std": 0.0, "n": 1}
    assert (tumour["n_absent"], tumour["n_hd95_undefined"]) == (1, 1)
    # Overall Dice: case means 0.7, 0.7, 0.4 -> mean 0.6; class means 0.8 and 0.25.
    overall = s["overall"]["dice"]
    assert overall["mean"] == pytest.approx(0.6)
    assert overall["std"] == pytest.approx(math.sqrt((0.01 + 0.01 + 0.04) / 3))
    assert overall["n"] == 3
    assert overall["mean_of_class_means"] == pytest.approx(0.525)


def test_write_reports(tmp_path: Path) -> None:
    per_case = _per_case()
    summary = ev.summarize(per_case)
    out = tmp_path / "sub" / "metrics.json"
    json_path, csv_path = ev.write_reports(per_case, summary, out, extra={"run": "r1"},
                                           nsd_tolerance_mm=1.5)
    assert (json_path, csv_path) == (out, tmp_path / "sub" / "metrics.csv")
    text = json_path.read_text()

    def _reject(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    report = json.loads(text, parse_constant=_reject)  # strict JSON: NaN written as null
    assert report["run"] == "r1"
    assert report["rules"]["nsd_tolerance_mm"] == 1.5
    assert report["rules"]["absent_class"] == mt.ABSENT_CLASS_RULE
    assert report["per_case"]["c2"]["tumour"]["dice"] is None
    assert report["summary"]["classes"]["liver"]["dice"]["mean"] == pytest.approx(0.8)
    with csv_path.open() as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["case", "class", "dice", "nsd", "hd95"]
    assert len(rows) == 1 + 3 * 2
    assert rows[1] == ["c1", "liver", "0.9", "0.8", "2.0"]
    assert rows[4] == ["c2", "tumour", "nan", "nan", "nan"]
    with pytest.raises(ValueError, match="redefine"):
        ev.write_reports(per_case, summary, out, extra={"summary": 1})


# ---------------------------------------------------------------- sliding window


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Conv3d(4, 3, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@dataclass
class _Out:
    logits: Tensor


class _WindowMean(nn.Module):
    """Parameter-free: every output voxel is its window's mean (piecewise constant tiles)."""

    def forward(self, x: Tensor) -> _Out:
        return _Out(x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x).clone())


def test_sliding_window_equals_forward_when_roi_is_volume() -> None:
    torch.manual_seed(0)
    net, image = _Net(), torch.randn(1, 2, 16, 12, 8)
    net.train()
    out = ev.sliding_window_predict(net, image, roi=(16, 12, 8), overlap=0.5)
    assert net.training  # mode restored
    assert not out.requires_grad
    net.eval()
    with torch.no_grad():
        ref = net(image)
    assert out.shape == (1, 3, 16, 12, 8)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_sliding_window_pads_small_volume() -> None:
    net, image = _Net(), torch.randn(1, 2, 10, 9, 8)
    out = ev.sliding_window_predict(net, image, roi=(16, 16, 16), mode="constant")
    assert out.shape == (1, 3, 10, 9, 8)
    assert net.training  # a fresh module is in training mode and stays so


def test_gaussian_blending_is_smooth() -> None:
    ramp = torch.linspace(0, 1, 48).view(1, 1, 48, 1, 1).expand(1, 1, 48, 16, 16).contiguous()
    model = _WindowMean()
    outs = {mode: ev.sliding_window_predict(model, ramp, roi=(16, 16, 16), overlap=0.5,
                                            mode=mode)
            for mode in ("constant", "gaussian")}
    jumps = {m: o[0, 0, :, 8, 8].diff().abs().max().item() for m, o in outs.items()}
    # Constant blending steps where windows start; Gaussian weights fade them in.
    assert jumps["gaussian"] < 0.5 * jumps["constant"]
    # The Gaussian weights are normalised: a constant prediction stays that constant.
    ones = ev.sliding_window_predict(lambda_net(), torch.zeros(1, 1, 40, 20, 20), roi=(16, 16, 16))
    torch.testing.assert_close(ones, torch.full_like(ones, 3.0))


def lambda_net() -> nn.Module:
    """A model whose logits are 3 everywhere."""

    class _Three(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.full_like(x, 3.0)

    return _Three()


# ---------------------------------------------------------------- classification


def _brute_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_binary_auc_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([0.1, 0.2, 0.8, 0.9])
    probs = np.stack([1 - perfect, perfect], axis=1)
    assert mt.classification_metrics(probs, labels)["auc"] == 1.0
    assert mt.classification_metrics(probs[:, ::-1], labels)["auc"] == 0.0
    tied = np.full((4, 2), 0.5)
    assert mt.classification_metrics(tied, labels)["auc"] == 0.5
    # pos {0.5, 0.8} vs neg {0.5, 0.2}: wins 1 + 1 + 1 and one tie -> 3.5 / 4.
    s = np.array([0.5, 0.2, 0.5, 0.8])
    res = mt.classification_metrics(np.stack([1 - s, s], axis=1), labels)
    assert res["auc"] == pytest.approx(0.875)
    assert res["accuracy"] == pytest.approx(0.75)  # the 0.5 tie arg-maxes to class 0


def test_multiclass_auc_matches_pair_count() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    probs = np.round(rng.dirichlet(np.ones(4), size=40) + 0.3 * np.eye(4)[labels], 1)  # ties
    res = mt.classification_metrics(probs, labels)
    per_class = [_brute_auc(probs[:, c], labels == c) for c in range(4)]
    np.testing.assert_allclose(res["auc_per_class"], per_class)
    assert res["auc"] == pytest.approx(np.mean(per_class))
    assert res["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert "note" not in res


def test_auc_matches_sklearn_when_available() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 12)
    probs = rng.dirichlet(np.ones(3), size=36)
    res = mt.classification_metrics(probs, labels)
    assert res["auc"] == pytest.approx(metrics.roc_auc_score(labels, probs, multi_class="ovr",
                                                             average="macro"))


def test_auc_undefined_without_positives() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    res = mt.classification_metrics(probs, np.array([0, 1, 0]))  # class 2 never occurs
    assert math.isnan(res["auc"]) and "[2]" in res["note"]
    assert res["auc_per_class"][0] == 1.0
    assert math.isnan(mt.classification_metrics(probs[:, :2], np.zeros(3, int))["auc"])
    with pytest.raises(ValueError):
        mt.classification_metrics(probs, np.array([0, 1, 3]))


def test_sliding_window_progress_bar_shows_an_eta(capsys: pytest.CaptureFixture) -> None:
    out = ev.sliding_window_predict(lambda_net(), torch.zeros(1, 1, 40, 20, 20),
                                    roi=(16, 16, 16), progress=True)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))  # same result with the bar
    err = capsys.readouterr().err
    assert "100%" in err and "<" in err  # tqdm's "[elapsed<remaining" field


def test_evaluate_console_summary_lists_mean_dice_and_nsd() -> None:
    from mim3d.engine.evaluate import summary_lines

    pred = np.zeros(SHAPE, np.int32)
    gt = np.zeros(SHAPE, np.int32)
    gt[4:12, 4:12, 4:12] = 1
    pred[4:12, 4:12, 4:10] = 1  # Dice 2 * 384 / (384 + 512) = 6/7
    gt[20:28, 20:28, 20:28] = 2
    pred[20:28, 20:28, 20:28] = 2
    case = mt.evaluate_case(pred, gt, spacing=(1.0, 1.0, 1.0), class_ids=[1, 2],
                            class_names=["liver", "spleen"], nsd_tolerance_mm=1.0)
    lines = summary_lines({"summary": ev.summarize({"a": case})})
    assert lines[0].split() == ["class", "dice", "nsd"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows["liver"][0] == f"{6 / 7:.4f}" and rows["spleen"] == ["1.0000", "1.0000"]
    assert rows["overall"][0] == f"{(6 / 7 + 1) / 2:.4f}"
    assert summary_lines({"summary": {"accuracy": 0.5, "auc": float("nan")}}) == [
        "accuracy 0.5000  AUC n/a"]
