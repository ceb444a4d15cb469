"""Seeded synthetic CT-like abdominal phantoms with a BTCV-style label map.

The phantoms are the embedded default data set for the demo and the tests, and a sanity cohort
for users. A case is a supine patient on a table, in Hounsfield units, with the 13 BTCV organs
plus body, bone, lung and bowel gas labelled. Array axes follow RAS+: index 0 grows towards the
patient's Right, index 1 towards Anterior, index 2 towards Superior (nibabel's canonical order).

Anatomy is laid out in patient-normalised coordinates (u, v, w) that scale with the body and the
field of view, so every organ is present whatever the shape and spacing (tiny grids may lose the
smallest ones): u = x / sx (+ right), v = (y - yc) / sy (+ anterior), w = z / (half z extent)
(+ superior). The body outline is a fixed superellipse in (u, v).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from mim3d.data.phantom_shapes import Canvas, Frame, blob, smooth_field, tube
from mim3d.data.volume import Volume

__all__ = ["LABELS", "TISSUE_HU", "make_phantom", "write_cohort"]

LABELS: dict[int, str] = {
    0: "background", 1: "spleen", 2: "right_kidney", 3: "left_kidney", 4: "gallbladder",
    5: "esophagus", 6: "liver", 7: "stomach", 8: "aorta", 9: "inferior_vena_cava",
    10: "portal_and_splenic_veins", 11: "pancreas", 12: "right_adrenal_gland",
    13: "left_adrenal_gland", 14: "body", 15: "bone", 16: "lung", 17: "gas",
}

#: Per-tissue HU as (mean, sd); each case draws one value per tissue, clipped to mean +- 2 sd.
#: Enhancement mimics an arterial-to-early-portal phase (bright aorta and renal cortex).
TISSUE_HU: dict[str, tuple[float, float]] = {
    "fat": (-100.0, 10.0), "muscle": (50.0, 6.0), "liver": (60.0, 10.0), "spleen": (50.0, 8.0),
    "kidney_cortex": (150.0, 20.0), "kidney_medulla": (70.0, 10.0), "gallbladder": (12.0, 5.0),
    "stomach": (25.0, 8.0), "pancreas": (45.0, 8.0), "aorta": (180.0, 25.0), "ivc": (100.0, 15.0),
    "portal_vein": (130.0, 20.0), "esophagus": (40.0, 6.0), "adrenal": (35.0, 8.0),
    "bowel": (30.0, 8.0), "heart": (160.0, 20.0), "lung": (-850.0, 25.0), "gas": (-1000.0, 5.0),
    "bone_cortex": (700.0, 80.0), "bone_marrow": (250.0, 40.0), "disc": (80.0, 10.0),
    "csf": (10.0, 5.0), "table": (300.0, 60.0),
}

_BODY, _BONE, _LUNG, _GAS = 14, 15, 16, 17
_Vec3 = tuple[float, float, float]

# Organs in paint order: later entries win where shapes touch, so small structures that sit
# inside or against big ones (vessels through the liver, adrenals) come last.
# Blob: (label, HU key, centre (u, v, w), radii (u, v, w), rotation about S in degrees).
# Tube: (label, HU key, centreline points (u, v, w), radius per point in u units).
_BLOB, _TUBE = "blob", "tube"
_ORGANS: tuple[tuple, ...] = (
    (_BLOB, 6, "liver", (0.38, 0.02, 0.28), (0.42, 0.50, 0.36), 0.0),
    (_BLOB, 6, "liver", (0.00, 0.30, 0.38), (0.30, 0.20, 0.20), -20.0),
    (_BLOB, 1, "spleen", (-0.60, -0.18, 0.30), (0.16, 0.26, 0.22), 35.0),
    (_BLOB, 7, "stomach", (-0.30, 0.28, 0.36), (0.26, 0.22, 0.24), -30.0),
    (_BLOB, 2, "kidney", (0.40, -0.30, -0.20), (0.16, 0.14, 0.26), -25.0),
    (_BLOB, 3, "kidney", (-0.40, -0.28, -0.10), (0.16, 0.14, 0.26), 25.0),
    (_BLOB, 4, "gallbladder", (0.30, 0.36, 0.05), (0.08, 0.12, 0.12), 30.0),
    (_TUBE, 11, "pancreas", ((0.12, 0.12, -0.02), (-0.05, 0.14, 0.06), (-0.40, 0.00, 0.14)),
     (0.075, 0.065, 0.055)),
    (_TUBE, 10, "portal_vein", ((-0.42, -0.06, 0.15), (-0.05, 0.06, 0.06), (0.06, 0.06, 0.02),
                                (0.22, 0.08, 0.20), (0.30, 0.06, 0.26)), (0.03,) * 5),
    (_TUBE, 9, "ivc", ((0.13, -0.06, -0.80), (0.12, -0.04, 0.55)), (0.06, 0.06)),
    (_TUBE, 8, "aorta", ((-0.07, -0.07, -0.80), (-0.08, -0.08, 0.40), (-0.10, -0.10, 1.30)),
     (0.065, 0.065, 0.065)),
    (_TUBE, 5, "esophagus", ((-0.02, 0.04, 1.30), (-0.03, 0.05, 0.70), (-0.15, 0.12, 0.45)),
     (0.045, 0.045, 0.045)),
    (_BLOB, 12, "adrenal", (0.22, -0.22, 0.12), (0.035, 0.07, 0.09), 40.0),
    (_BLOB, 13, "adrenal", (-0.20, -0.20, 0.10), (0.035, 0.07, 0.09), -40.0),
)


def _draw_hu(rng: np.random.Generator) -> dict[str, float]:
    """One HU value per tissue for this case."""
    return {name: float(np.clip(rng.normal(mean, sd), mean - 2 * sd, mean + 2 * sd))
            for name, (mean, sd) in TISSUE_HU.items()}


def _make_frame(shape: tuple[int, int, int], spacing: _Vec3, rng: np.random.Generator,
                ) -> tuple[Frame, np.ndarray, dict[str, float]]:
    """Draw the body geometry and return the frame, the affine and the table placement."""
    half = [(n - 1) * s / 2.0 for n, s in zip(shape, spacing)]
    coords = [np.linspace(-h, h, n, dtype=np.float64) for h, n in zip(half, shape)]
    # The table sits near the posterior edge; the body lies on it with a small gap.
    tab_thick = max(3.0, 1.6 * spacing[1])
    tab_y = -0.88 * half[1]
    y_back = tab_y + tab_thick / 2 + rng.uniform(3.0, 8.0)
    depth_ratio = rng.uniform(0.64, 0.78)  # anteroposterior / lateral half-size
    sx = rng.uniform(0.78, 0.88) * half[0]
    sx = min(sx, (0.96 * half[1] - y_back) / (2 * depth_ratio))
    sy = sx * depth_ratio / 0.72  # the outline's v half-size is 0.72
    yc = y_back + 0.72 * sy
    u, v = coords[0] / sx, (coords[1] - yc) / sy
    w = coords[2] / half[2] + rng.uniform(-0.08, 0.08)  # scan range varies from case to case
    uu, vv = u[:, None], v[None, :]
    rb = (np.abs(uu) ** 2.2 + np.abs(vv / 0.72) ** 2.2) ** (1 / 2.2)
    wall = 1.0 - rng.uniform(0.06, 0.14)  # subcutaneous fat thickness varies
    cavity = (rb < wall - 0.06) & (vv > -0.48)
    side = np.where(uu > 0, 0.42, 0.36) + rng.uniform(-0.04, 0.04)  # right dome sits higher
    bump = np.clip(1 - ((np.abs(uu) - 0.42) / 0.42) ** 2 - (vv / 0.5) ** 2, 0, None)
    dome = side + 0.28 * bump
    frame = Frame(u.astype(np.float32), v.astype(np.float32), w.astype(np.float32),
                   sy / sx, half[2] / sx, rb, cavity, wall, dome, coords[1])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-h for h in half]
    table = {"y": tab_y, "thick": tab_thick, "half_x": half[0], "x_mm": coords[0]}
    return frame, affine, table


def _paint_body(canvas: Canvas, frame: Frame, table: dict[str, float],
                rng: np.random.Generator, hu: dict[str, float]) -> None:
    """Table, body outline, subcutaneous fat, muscle wall, paraspinal and psoas muscles."""
    full = (slice(None),) * 3
    x = table["x_mm"][:, None]
    # Slightly concave table, thin and dense: outside the body, labelled background.
    ty = table["y"] + 8.0 * (x / table["half_x"]) ** 2
    on_table = (np.abs(frame.y_mm[None, :] - ty) < table["thick"] / 2) & (
        np.abs(x) < 0.92 * table["half_x"])
    canvas.paint(full, on_table[:, :, None], None, hu["table"])
    canvas.paint(full, (frame.rb <= 1.0)[:, :, None], _BODY, hu["fat"])
    uu, vv = frame.u[:, None], frame.v[None, :]
    # Wall muscle between subcutaneous fat and the cavity; behind the cavity, paraspinals.
    muscle = (frame.rb < frame.wall) & ~frame.cavity
    muscle |= (np.abs(uu) < 0.36) & (vv < -0.42) & (frame.rb < frame.wall)
    canvas.paint(full, muscle[:, :, None], None, hu["muscle"])
    # Bowel: a random field split into loops of soft tissue, pockets of gas, mesenteric fat.
    field = smooth_field(rng, canvas.hu.shape, cell=max(3.0, canvas.hu.shape[0] / 20))
    belly = frame.cavity[:, :, None] & (frame.w[None, None, :] < frame.dome[:, :, None] - 0.1)
    canvas.paint(full, belly & (field > -0.2), _BODY, hu["bowel"])
    low = frame.w[None, None, :] < 0.25
    canvas.paint(full, belly & low & (field > 1.5), _GAS, hu["gas"])
    for sgn in (1.0, -1.0):  # psoas widens towards the pelvis
        pts = np.array([[0.20 * sgn, -0.30, 0.15], [0.24 * sgn, -0.28, -1.3]])
        tube(canvas, frame, pts, np.array([0.03, 0.10]), _BODY, hu["muscle"], True)


def _organ_hu(key: str, hu: dict[str, float], q: np.ndarray, front: np.ndarray,
              ) -> float | np.ndarray:
    """HU of an organ, with internal structure where it matters."""
    if key == "kidney":  # bright cortex around a darker medulla (corticomedullary phase)
        return np.where(q > 0.62, hu["kidney_cortex"], hu["kidney_medulla"])
    if key == "stomach":  # supine patient: swallowed air collects anteriorly
        return np.where(front > 0.7, hu["gas"], hu["stomach"])
    return hu[key]


def _paint_organs(canvas: Canvas, frame: Frame, rng: np.random.Generator,
                  hu: dict[str, float]) -> None:
    """The 13 BTCV organs, each jittered in position, size, orientation and shape."""
    for kind, label, key, where, size, *rest in _ORGANS:
        shift = rng.normal(0.0, [0.025, 0.025, 0.03])
        if kind == _BLOB:
            centre = np.asarray(where) + shift
            radii = np.asarray(size) * rng.uniform(0.9, 1.1, 3)
            sl, mask, q, front = blob(frame, rng, centre, radii, rest[0] + rng.normal(0, 8))
            mask &= frame.inside(sl, below_dome=True)
            canvas.paint(sl, mask, label, _organ_hu(key, hu, q, front))
        else:
            pts = np.asarray(where) + shift
            radii = np.asarray(size) * rng.uniform(0.85, 1.15)
            tube(canvas, frame, pts, radii, label, hu[key], below_dome=key == "pancreas")


def _paint_thorax(canvas: Canvas, frame: Frame, hu: dict[str, float]) -> None:
    """Lungs above the diaphragm, either side of the mediastinum, and the heart between."""
    full = (slice(None),) * 3
    uu, vv = frame.u[:, None, None], frame.v[None, :, None]
    above = frame.w[None, None, :] > frame.dome[:, :, None] + 0.03
    lung = frame.cavity[:, :, None] & above & (np.abs(uu) > 0.2)
    # Dependent (posterior) lung is denser, as in a supine scan.
    canvas.paint(full, lung, _LUNG, hu["lung"] - 30.0 * vv, onto=(_BODY,))
    heart = ((uu + 0.08) / 0.30) ** 2 + ((vv - 0.30) / 0.22) ** 2 + (
        (frame.w[None, None, :] - 0.95) / 0.30) ** 2 < 1.0
    canvas.paint(full, heart & above & frame.cavity[:, :, None], _BODY, hu["heart"],
                 onto=(_BODY, _LUNG))


def _paint_bone(canvas: Canvas, frame: Frame, rng: np.random.Generator,
                hu: dict[str, float]) -> None:
    """Spine (with discs and canal), ribs and iliac wings; cortex brighter than marrow."""
    full, soft = (slice(None),) * 3, (_BODY, _GAS)
    uu, vv, ww = frame.u[:, None], frame.v[None, :], frame.w[None, None, :]
    vert = (uu / 0.14) ** 2 + ((vv + 0.30) / 0.12) ** 2 < 1.0
    canal_r = np.hypot(uu, (vv + 0.50) * frame.ky)
    arch = (canal_r < 0.095) | ((uu / 0.025) ** 2 + ((vv + 0.58) / 0.06) ** 2 < 1.0)
    disc = ((ww - rng.uniform(0, 0.3)) / 0.3) % 1.0 < 0.15
    canvas.paint(full, vert[:, :, None] & ~disc, _BONE, 0.0, onto=soft)
    canvas.paint(full, vert[:, :, None] & disc, _BODY, hu["disc"], onto=soft)
    canvas.paint(full, arch[:, :, None], _BONE, 0.0, onto=soft)
    canvas.paint(full, (canal_r < 0.055)[:, :, None], _BODY, hu["csf"])
    # Ribs: segments of the wall, oblique (posterior end higher), sparing the front.
    ang = np.sin(np.arctan2(vv / 0.72, uu))
    band = (frame.rb > frame.wall - 0.07) & (frame.rb < frame.wall - 0.01) & (ang < 0.6)
    phase = ww / 0.16 + 1.2 * (1 - ang[:, :, None]) + rng.uniform(0, 1)
    zs = (slice(None), slice(None), slice(int(np.searchsorted(frame.w, -0.3)), None))
    canvas.paint(zs, band[:, :, None] & (phase[zs] % 1.0 < 0.35), _BONE, 0.0, onto=soft)
    for sgn in (1.0, -1.0):
        centre = np.array([0.55 * sgn, -0.20, -1.05]) + rng.normal(0, 0.02, 3)
        sl, mask, _, _ = blob(frame, rng, centre, np.array([0.09, 0.30, 0.40]), 35.0 * sgn)
        canvas.paint(sl, mask & frame.cavity[sl[0], sl[1], None], _BONE, 0.0, onto=soft)
    bone = canvas.label == _BONE
    marrow = ndimage.binary_erosion(bone)
    canvas.hu[bone] = hu["bone_cortex"]
    canvas.hu[marrow] = hu["bone_marrow"]


def _finish(canvas: Canvas, rng: np.random.Generator, noise_sd: float) -> np.ndarray:
    """Tissue texture, partial-volume blur and correlated noise; returns int16 HU.

    White noise is added before the one Gaussian blur, so the blur both softens edges (partial
    volume) and correlates the noise, as CT reconstruction kernels do; its amplitude is scaled
    up by the blur's known noise reduction so the final noise sd is ``noise_sd``.
    """
    texture = smooth_field(rng, canvas.hu.shape, max(2.0, canvas.hu.shape[0] / 32))
    texture *= 6.0
    texture[canvas.label == 0] = 0.0  # parenchymal heterogeneity, not in the air
    canvas.hu += texture
    sigma = 0.5
    radius = int(4.0 * sigma + 0.5)  # scipy's default truncation
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    gain = float(np.sum(kernel ** 2)) ** 1.5  # sd of blurred unit white noise, 3 separable axes
    canvas.hu += rng.standard_normal(canvas.hu.shape, dtype=np.float32) * (noise_sd / gain)
    img = ndimage.gaussian_filter(canvas.hu, sigma=sigma)
    np.clip(img, -1024, 3071, out=img)
    return np.rint(img, out=img).astype(np.int16)


def _check_int(name: str, value: object, minimum: int) -> int:
    """Validate an integer argument (bools refused) and return it as ``int``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_geometry(shape: tuple[int, int, int], spacing: _Vec3) -> tuple[tuple, tuple]:
    """Validate shape (>= 32 per axis) and spacing (positive, finite); return clean tuples."""
    if len(tuple(shape)) != 3 or any(int(n) != n or int(n) < 32 for n in shape):
        raise ValueError(f"shape must be 3 integers >= 32, got {shape!r}")
    if len(tuple(spacing)) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be 3 positive finite mm values, got {spacing!r}")
    return tuple(int(n) for n in shape), tuple(float(s) for s in spacing)


def make_phantom(*, shape: tuple[int, int, int] = (128, 128, 96),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
                 seed: int = 0) -> tuple[Volume, Volume]:
    """Generate one synthetic abdominal CT case.

    Args:
        shape: voxels along the R, A and S axes (each >= 32).
        spacing: voxel size in mm along the same axes.
        seed: non-negative integer; the same seed gives the same case.

    Returns:
        ``(image, label)``: int16 HU and uint8 labels (ids in :data:`LABELS`), sharing one RAS+
        affine centred on the world origin. ``image.meta`` holds the drawn per-tissue HU
        (``"hu"``), the noise sd and the seed.

    Raises:
        ValueError: bad shape, spacing or seed.
    """
    shape, spacing = _check_geometry(shape, spacing)
    seed = _check_int("seed", seed, 0)
    rng = np.random.default_rng(seed)
    hu = _draw_hu(rng)
    frame, affine, table = _make_frame(shape, spacing, rng)
    canvas = Canvas(shape)
    _paint_body(canvas, frame, table, rng, hu)
    _paint_organs(canvas, frame, rng, hu)
    _paint_thorax(canvas, frame, hu)
    _paint_bone(canvas, frame, rng, hu)
    noise_sd = float(rng.uniform(10.0, 20.0))
    image = _finish(canvas, rng, noise_sd)
    meta = {"generator": "mim3d.data.phantom", "seed": seed, "hu": hu, "noise_sd": noise_sd}
    source = f"phantom:seed={seed}"
    return (Volume(image, affine.copy(), source, meta),
            Volume(canvas.label, affine.copy(), source, {"labels": dict(LABELS)}))


def _save_nifti(vol: Volume, path: Path, dtype: type) -> None:
    """Write a NIfTI with matching qform/sform (scanner-anatomical) and mm units."""
    img = nib.Nifti1Image(np.asarray(vol.array, dtype=dtype), vol.affine)
    img.header.set_data_dtype(dtype)
    img.set_qform(vol.affine, code=1)
    img.set_sform(vol.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_cohort(out_dir: str | Path, n: int, *, seed: int = 0,
                 shape: tuple[int, int, int] = (128, 128, 96),
                 spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
                 val_fraction: float = 0.2) -> Path:
    """Write ``n`` phantom cases and an MSD-style ``dataset.json`` datalist.

    Case ``i`` is seeded by child ``i`` of ``SeedSequence(seed)``, so it does not depend on
    ``n``. The last ``ceil(n * val_fraction)`` cases (at most ``n - 1``; none when ``n == 1``)
    are "validation", the rest "training"; "numTraining" counts all labelled cases on disk, as
    MSD and BTCV datalists do.

    Args:
        out_dir: folder to create or fill (``imagesTr/``, ``labelsTr/``, ``dataset.json``).
        n: number of cases (>= 1).
        seed: non-negative cohort seed.
        shape: voxels per case (each axis >= 32).
        spacing: voxel size in mm (positive).
        val_fraction: share of cases held out for validation, in [0, 1).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        ValueError: a bad argument, named in the message.
    """
    n, seed = _check_int("n", n, 1), _check_int("seed", seed, 0)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    shape, spacing = _check_geometry(shape, spacing)
    root = Path(out_dir)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n)):
        image, label = make_phantom(shape=shape, spacing=spacing,
                                    seed=int(child.generate_state(1, dtype=np.uint64)[0]))
        name = f"phantom_{i:03d}.nii.gz"
        _save_nifti(image, root / "imagesTr" / name, np.int16)
        _save_nifti(label, root / "labelsTr" / name, np.uint8)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    n_val = min(math.ceil(n * val_fraction), n - 1) if n >= 2 else 0
    datalist = {
        "name": "mim3d-phantom",
        "description": "Synthetic CT-like abdominal phantoms (HU) generated by mim3d.data.phantom",
        "reference": "mim3d.data.phantom", "tensorImageSize": "3D", "modality": {"0": "CT"},
        "labels": {str(k): v for k, v in LABELS.items()},
        "numTraining": int(n), "numTest": 0,
        "training": entries[: n - n_val], "validation": entries[n - n_val:], "test": [],
    }
    path = root / "dataset.json"
    path.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    return path
