"""Tests of mim3d.masking (token layout, geometry rules, nested MiM masks) and the level picture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mim3d.masking import (
    GeometryError,
    build_geometry,
    child_boxes,
    expand_units,
    levels_to_json,
    mask_indices,
    patchify,
    sample_children,
    sample_levels,
    unit_mask,
    unpatchify,
)

GEOMETRIES = {
    "default": {"crop_sizes": [(192,) * 3, (96,) * 3, (16,) * 3], "input_size": (96,) * 3,
                "patch_size": 16, "mask_ratios": [0.6] * 3, "gammas": [4, 4]},
    "tiny": {"crop_sizes": [(64,) * 3, (32,) * 3, (8,) * 3], "input_size": (32,) * 3,
             "patch_size": 8, "mask_ratios": [0.6] * 3, "gammas": [3, 2]},
    "two_levels": {"crop_sizes": [(192,) * 3, (96,) * 3], "input_size": (96,) * 3,
                   "patch_size": 16, "mask_ratios": [0.5, 0.75], "gammas": [2]},
    "one_level": {"crop_sizes": [(96,) * 3], "input_size": (96,) * 3, "patch_size": 16,
                  "mask_ratios": [0.75], "gammas": []},
    # Anisotropic level 1 squeezed into an isotropic input: k = (3, 3, 3) then (1, 1, 1).
    "anisotropic": {"crop_sizes": [(192, 192, 96), (96, 96, 48), (16, 16, 8)],
                    "input_size": (96,) * 3, "patch_size": 16, "mask_ratios": [0.6] * 3,
                    "gammas": [4, 4]},
}
SEEDS = (0, 1, 7)


def _sample(name: str, seed: int, batch: int = 2, source: str = "masked"):
    geo = build_geometry(**GEOMETRIES[name], source=source)
    return geo, sample_levels(batch, geo, torch.Generator().manual_seed(seed), source=source)


def _covering_tokens(box, parent_box, geo):
    """Token ranges of the parent covering a voxel box, computed independently of the code."""
    ranges = []
    for ax in range(3):
        s, g = geo.crop_size[ax], geo.token_grid[ax]
        lo = (box[ax][0] - parent_box[ax][0]) * g / s
        hi = (box[ax][1] - parent_box[ax][0]) * g / s
        ranges.append(range(math.floor(lo), math.ceil(hi)))
    return ranges


def _is_union_of_blocks(mask_grid: torch.Tensor, k) -> bool:
    """True when a (g0, g1, g2) bool grid is constant on every aligned k0 x k1 x k2 block."""
    g = mask_grid.shape
    blocks = mask_grid.reshape(g[0] // k[0], k[0], g[1] // k[1], k[1], g[2] // k[2], k[2])
    blocks = blocks.permute(0, 2, 4, 1, 3, 5).reshape(-1, k[0] * k[1] * k[2])
    return bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all())


# ---------------------------------------------------------------- patchify ----------------------

def test_patchify_roundtrip_and_shape():
    x = torch.randn(2, 3, 8, 12, 4)
    t = patchify(x, 4)
    assert t.shape == (2, 2 * 3 * 1, 64 * 3)
    assert torch.equal(unpatchify(t, 4, (2, 3, 1), channels=3), x)


def test_patchify_hand_checked_value():
    x = torch.arange(1 * 2 * 4 * 4 * 4).reshape(1, 2, 4, 4, 4)
    t = patchify(x, 2)  # grid (2, 2, 2)
    # Token (i, j, k) = (1, 0, 1) -> flat (1 * 2 + 0) * 2 + 1 = 5.
    # In-token (pd, ph, pw, c) = (1, 0, 1, 1) -> ((1 * 2 + 0) * 2 + 1) * 2 + 1 = 11.
    # That voxel is d = 1*2+1 = 3, h = 0*2+0 = 0, w = 1*2+1 = 3, channel 1.
    assert t[0, 5, 11] == x[0, 1, 3, 0, 3]
    assert t[0, 0, 0] == x[0, 0, 0, 0, 0]


def test_patchify_rejects_indivisible():
    with pytest.raises(GeometryError, match="patch=4"):
        patchify(torch.zeros(1, 1, 8, 8, 6), 4)


# ---------------------------------------------------------------- geometry ----------------------

def test_default_geometry_values():
    g1, g2, g3 = build_geometry(**GEOMETRIES["default"])
    assert (g1.token_grid, g1.unit_tokens, g1.unit_grid) == ((6, 6, 6), (3, 3, 3), (2, 2, 2))
    assert (g1.n_units, g1.n_masked, g1.gamma) == (8, 5, 4)  # round(4.8) = 5
    assert (g2.unit_tokens, g2.n_units, g2.n_masked, g2.gamma) == ((1, 1, 1), 216, 130, 4)
    assert (g3.unit_tokens, g3.n_masked, g3.gamma) == ((1, 1, 1), 130, 0)


def test_anisotropic_geometry_valid_and_invalid():
    g1, g2, _ = build_geometry(**GEOMETRIES["anisotropic"])
    assert g1.unit_tokens == (3, 3, 3) and g2.unit_tokens == (1, 1, 1)
    bad = dict(GEOMETRIES["anisotropic"], input_size=(96, 96, 48),
               crop_sizes=[(192, 192, 96), (96, 96, 48), (16, 16, 8)])
    with pytest.raises(GeometryError, match=r"crop_sizes\[1\].*1\.5 tokens on axis 2"):
        build_geometry(**bad)


@pytest.mark.parametrize("change, pattern", [
    ({"gammas": [6, 4]}, r"gammas\[0\]=6.*5 masked units"),
    ({"crop_sizes": [(192,) * 3, (80,) * 3, (16,) * 3]}, r"crop_sizes\[1\].*2\.5 tokens"),
    ({"input_size": (96, 96, 90)}, r"input_size=\(96, 96, 90\).*patch_size=16"),
    ({"crop_sizes": [(192,) * 3, (384,) * 3, (16,) * 3]}, r"crop_sizes\[1\].*larger"),
    ({"mask_ratios": [0.6, 1.0, 0.6]}, r"mask_ratios\[1\]=1\.0"),
    ({"mask_ratios": [0.6, 0.6]}, r"mask_ratios=.*one per level \(3\)"),
    ({"gammas": [4]}, r"gammas=\[4\].*\(2\)"),
    ({"crop_sizes": []}, r"crop_sizes"),
])
def test_impossible_geometries_raise(change, pattern):
    with pytest.raises(GeometryError, match=pattern):
        build_geometry(**dict(GEOMETRIES["default"], **change))


def test_unmasked_source_checks_unmasked_count():
    # 8 units, 5 masked -> only 3 unmasked: gamma 4 is possible from masked, not from unmasked.
    with pytest.raises(GeometryError, match=r"gammas\[0\]=4.*3 unmasked"):
        build_geometry(**GEOMETRIES["default"], source="unmasked")


# ---------------------------------------------------------------- primitives --------------------

def test_unit_mask_exact_count_and_expand_units_hand_checked():
    m = unit_mask(5, 8, 3, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.sum(1).tolist() == [3] * 5
    um = torch.zeros(1, 8, dtype=torch.bool)
    um[0, 5] = True  # unit (1, 0, 1) on a 2x2x2 unit grid of 2x2x2-token units
    tokens = expand_units(um, (2, 2, 2), (2, 2, 2))[0].nonzero().flatten().tolist()
    # Tokens i in {2,3}, j in {0,1}, k in {2,3} on a 4^3 grid: (i * 4 + j) * 4 + k.
    assert tokens == [34, 35, 38, 39, 50, 51, 54, 55]
    box = child_boxes(torch.tensor([[[0, 64]] * 3]), torch.tensor([[5]]), (2, 2, 2), (32,) * 3)
    assert box.tolist() == [[[32, 64], [0, 32], [32, 64]]]


def test_mask_indices_restore_convention():
    m = unit_mask(4, 30, 17, torch.Generator().manual_seed(3))
    keep, masked, restore = mask_indices(m)
    assert keep.shape == (4, 13) and masked.shape == (4, 17)
    assert not m.gather(1, keep).any() and m.gather(1, masked).all()
    assert torch.equal(keep, keep.sort(1).values) and torch.equal(masked, masked.sort(1).values)
    x = torch.randn(4, 30, 5)
    parts = torch.cat([x.gather(1, keep[..., None].expand(-1, -1, 5)),
                       x.gather(1, masked[..., None].expand(-1, -1, 5))], dim=1)
    assert torch.equal(parts.gather(1, restore[..., None].expand(-1, -1, 5)), x)
    with pytest.raises(ValueError):
        mask_indices(torch.tensor([[True, False], [True, True]]))


@pytest.mark.parametrize("source", ["masked", "unmasked"])
def test_sample_children_distinct_from_source(source):
    gen = torch.Generator().manual_seed(11)
    um = unit_mask(50, 8, 4, gen)
    kids = sample_children(um, 3, gen, source=source)
    assert kids.shape == (50, 3)
    assert all(len(set(r)) == 3 for r in kids.tolist())
    assert bool((um.gather(1, kids) == (source == "masked")).all())
    with pytest.raises(GeometryError, match="gamma=5"):
        sample_children(um, 5, gen, source=source)


# ---------------------------------------------------------------- sample_levels -----------------

@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("seed", SEEDS)
def test_levels_shapes_and_exact_ratios(name, seed):
    geo, levels = _sample(name, seed)
    assert len(levels) == len(geo)
    n_vol = 2
    for lm, g in zip(levels, geo):
        n = math.prod(g.token_grid)
        n_mask = g.n_masked * math.prod(g.unit_tokens)
        assert lm.mask.shape == (n_vol, n) and lm.unit_mask.shape == (n_vol, g.n_units)
        assert lm.mask.sum(1).tolist() == [n_mask] * n_vol
        assert lm.unit_mask.sum(1).tolist() == [g.n_masked] * n_vol
        assert lm.ids_keep.shape == (n_vol, n - n_mask) and lm.ids_mask.shape == (n_vol, n_mask)
        assert lm.boxes.shape == (n_vol, 3, 2) and lm.boxes.dtype == torch.long
        assert torch.equal(lm.boxes[:, :, 1] - lm.boxes[:, :, 0],
                           torch.tensor(g.crop_size).expand(n_vol, 3))
        n_vol *= max(g.gamma, 1)
    assert levels[0].boxes[:, :, 0].eq(0).all() and levels[0].parent.eq(-1).all()


@pytest.mark.parametrize("name", ["default", "tiny", "two_levels", "anisotropic"])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("source", ["masked", "unmasked"])
def test_children_inside_fully_masked_units(name, seed, source):
    if source == "unmasked":  # needs enough unmasked units: lower level-1 ratio
        ratios = [0.25] + GEOMETRIES[name]["mask_ratios"][1:]
        geo = build_geometry(**dict(GEOMETRIES[name], mask_ratios=ratios), source=source)
        levels = sample_levels(2, geo, torch.Generator().manual_seed(seed), source=source)
    else:
        geo, levels = _sample(name, seed)
    for l in range(1, len(levels)):
        par_lm, child_lm, pg = levels[l - 1], levels[l], geo[l - 1]
        for c in range(child_lm.boxes.shape[0]):
            p = int(child_lm.parent[c])
            assert p == c // pg.gamma  # parent-major order
            pbox, box = par_lm.boxes[p].tolist(), child_lm.boxes[c].tolist()
            assert all(pbox[a][0] <= box[a][0] < box[a][1] <= pbox[a][1] for a in range(3))
            ranges = _covering_tokens(box, pbox, pg)
            assert [len(r) for r in ranges] == list(pg.unit_tokens)  # exactly one unit
            grid = par_lm.mask[p].reshape(pg.token_grid)
            covered = grid[ranges[0].start:ranges[0].stop, ranges[1].start:ranges[1].stop,
                           ranges[2].start:ranges[2].stop]
            expect = source == "masked"
            assert bool((covered == expect).all()), f"child {c} of level {l + 1} not {source}"
            assert bool(par_lm.unit_mask[p, child_lm.parent_unit[c]]) == expect
        for p in range(par_lm.boxes.shape[0]):  # gamma distinct children per parent
            kids = child_lm.parent_unit[child_lm.parent == p].tolist()
            assert len(kids) == pg.gamma == len(set(kids))


@pytest.mark.parametrize("seed", range(20))
def test_level1_mask_is_union_of_spatial_blocks(seed):
    """DESIGN §8: units are 3x3x3 spatial blocks, not runs of 27 consecutive raster tokens."""
    _geo, levels = _sample("default", seed, batch=4)
    for row in levels[0].mask:
        assert _is_union_of_blocks(row.reshape(6, 6, 6), (3, 3, 3))
    # The check does catch the authors' layout: 5 runs of 27 consecutive raster tokens.
    runs = torch.zeros(216, dtype=torch.bool)
    runs[: 5 * 27] = True
    assert not _is_union_of_blocks(runs.reshape(6, 6, 6), (3, 3, 3))


def test_reproducible_by_seed():
    _, a = _sample("default", 5)
    _, b = _sample("default", 5)
    _, c = _sample("default", 6)
    for x, y in zip(a, b):
        assert torch.equal(x.mask, y.mask) and torch.equal(x.boxes, y.boxes)
    assert any(not torch.equal(x.mask, z.mask) for x, z in zip(a, c))


# ---------------------------------------------------------------- JSON --------------------------

def test_levels_to_json_schema_and_ids():
    geo, levels = _sample("tiny", 2, batch=3)
    doc = levels_to_json(levels, geo, sample=1)
    json.dumps(doc)  # plain JSON types only
    assert list(doc) == ["levels"] and len(doc["levels"]) == 3
    keys = ["level", "crop_size", "token_grid", "unit_tokens", "mask_ratio", "n_units",
            "n_masked", "effective_mask_ratio", "volumes"]
    for lvl, entry in enumerate(doc["levels"]):
        assert list(entry) == keys and entry["level"] == lvl + 1
        for v in entry["volumes"]:
            assert list(v) == ["id", "parent", "box", "masked_tokens"]
    ids = [[v["id"] for v in e["volumes"]] for e in doc["levels"]]
    assert ids == [["L1"], ["L2.0", "L2.1", "L2.2"],
                   [f"L3.{a}.{b}" for a in range(3) for b in range(2)]]
    parents = [v["parent"] for e in doc["levels"] for v in e["volumes"]]
    assert parents == [None, "L1", "L1", "L1"] + ["L2.0"] * 2 + ["L2.1"] * 2 + ["L2.2"] * 2
    # Sample 1's level-3 volume "L3.2.1" is index (1 * 3 + 2) * 2 + 1 = 11.
    v = doc["levels"][2]["volumes"][-1]
    assert v["box"] == levels[2].boxes[11].tolist()
    assert v["masked_tokens"] == levels[2].mask[11].nonzero().flatten().tolist()


def test_levels_to_json_flat_index_hand_checked():
    geo, levels = _sample("tiny", 0, batch=1)
    levels[0].mask[:] = False
    levels[0].mask[0, (1 * 4 + 2) * 4 + 3] = True  # token (i, j, k) = (1, 2, 3) on 4^3 -> 27
    doc = levels_to_json(levels, geo)
    assert doc["levels"][0]["volumes"][0]["masked_tokens"] == [27]
    assert doc["levels"][0]["volumes"][0]["box"] == [[0, 64]] * 3
    # The same token, found through patchify of a volume marking voxel (i*16, j*16, k*16).
    vol = torch.zeros(1, 1, 64, 64, 64)
    vol[0, 0, 16, 32, 48] = 1
    assert patchify(vol, 16)[0].sum(1).nonzero().flatten().tolist() == [27]


# ---------------------------------------------------------------- viz ---------------------------

@pytest.mark.parametrize("name", ["tiny", "one_level"])
def test_save_levels_png(tmp_path, name):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from mim3d.viz import save_levels_png

    geo, levels = _sample(name, 4, batch=2)
    s = geo[0].crop_size
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, n) for n in s], indexing="ij")
    crop = np.clip(1.0 - np.sqrt(zz**2 + yy**2 + xx**2), 0, 1).astype(np.float32)
    out = tmp_path / "levels.png"
    save_levels_png(crop, levels, geo, out, sample=1)
    img = imread(out)
    assert out.stat().st_size > 10_000
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="crop has shape"):
        save_levels_png(crop[:-1], levels, geo, tmp_path / "bad.png")
