"""The command line: exit codes, one-line errors, and each command's artefacts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_nifti

from mim3d.cli import main
from mim3d.data.store import PreparedStore
from mim3d.factory import _log_effective_ratios


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line; INFO messages (stderr by design, e.g. the effective mask ratios) may
    come before it, nothing after it."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error:" in line]
    assert len(errors) == 1 and err[-1] == errors[0], err
    return errors[0]


def test_python_dash_m_and_help() -> None:
    out = subprocess.run([sys.executable, "-m", "mim3d", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("prepare", "pretrain", "demo", "masks", "visualize", "phantoms", "presets"):
        assert command in out


def test_phantoms_then_prepare_with_bad_cases_exits_zero(tmp_path: Path, capsys) -> None:
    assert main(["phantoms", "--out", str(tmp_path / "ph"), "--n", "2", "--shape", "48", "48",
                 "40"]) == 0
    images = tmp_path / "ph" / "imagesTr"
    (images / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_nifti(images / "flat.nii.gz", np.zeros((8, 8), np.int16))
    capsys.readouterr()
    assert main(["prepare", str(images), "--out", str(tmp_path / "store"), "--preset", "tiny",
                 "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "prepared 2" in out and "quarantined 2" in out
    store = PreparedStore.open(tmp_path / "store")
    assert sorted(c.name for c in store.cases) == ["phantom_000", "phantom_001"]
    lines = (tmp_path / "store" / "quarantine.jsonl").read_text().splitlines()
    assert {json.loads(x)["name"] for x in lines} == {"broken", "flat"}


def test_prepare_with_nothing_usable_fails(tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.nii.gz").write_text("not an image")
    assert main(["prepare", str(tmp_path / "in"), "--out", str(tmp_path / "s"), "--preset",
                 "tiny", "--workers", "0"]) == 1
    assert "no usable case" in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["prepare", "/no/such/file.nii.gz", "--out", "{tmp}/s"], "/no/such/file.nii.gz"),
    (["prepare", "{tmp}", "--out", "{tmp}/s", "--preset", "huge"], "unknown preset 'huge'"),
    (["masks", "--input", "/no/such.nii.gz", "--out", "{tmp}/m"], "/no/such.nii.gz"),
    (["masks", "--input", "x", "--out", "{tmp}/m", "--set", "geometry.gammas=[9,4]"],
     "gamma"),
    (["visualize", "{tmp}", "--input", "x", "--out", "{tmp}/f.png"], "no complete checkpoint"),
])
def test_bad_input_is_one_clear_line(argv, words, tmp_path: Path, capsys) -> None:
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith(f"mim3d {argv[0]}: error:") and words in line, line


def test_masks_writes_the_documented_json(tmp_path: Path, capsys) -> None:
    from mim3d.data.phantom import make_phantom
    from mim3d.data.readers import write_volume

    image, _ = make_phantom(shape=(64, 64, 48), seed=1)
    write_volume(image, tmp_path / "ct.nii.gz")
    _log_effective_ratios.cache_clear()  # logged once per geometry and process
    assert main(["masks", "--input", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "m"),
                 "--preset", "tiny", "--seed", "3"]) == 0
    doc = json.loads((tmp_path / "m" / "levels.json").read_text())
    assert (tmp_path / "m" / "levels.png").stat().st_size > 10_000
    levels = doc["levels"]
    assert [lv["level"] for lv in levels] == [1, 2, 3]
    assert [len(lv["volumes"]) for lv in levels] == [1, 4, 16]
    assert levels[0]["crop_size"] == [64, 64, 64] and levels[0]["token_grid"] == [4, 4, 4]
    assert levels[0]["unit_tokens"] == [2, 2, 2] and levels[1]["unit_tokens"] == [1, 1, 1]
    first = levels[0]["volumes"][0]
    assert first["parent"] is None and first["box"] == [[0, 64], [0, 64], [0, 64]]
    assert len(first["masked_tokens"]) == round(0.6 * 8) * 8  # 5 of 8 octants, 8 tokens each
    # Whole units: 0.6 asked, 5/8 masked at level 1 and 38/64 tokens at levels 2 and 3.
    assert [(lv["mask_ratio"], lv["n_masked"], lv["n_units"], lv["effective_mask_ratio"])
            for lv in levels] == [(0.6, 5, 8, 0.625), (0.6, 38, 64, 0.59375),
                                  (0.6, 38, 64, 0.59375)]
    assert "level 1 5/8 = 62.5% (asked 60.0%); level 2 38/64 = 59.4%" in capsys.readouterr().err
    ids = {v["id"] for v in levels[1]["volumes"]}
    for child in levels[2]["volumes"]:
        assert child["parent"] in ids
        (a0, a1), (b0, b1), (c0, c1) = child["box"]
        assert (a1 - a0, b1 - b0, c1 - c0) == (8, 8, 8)
    again = tmp_path / "again"
    main(["masks", "--input", str(tmp_path / "ct.nii.gz"), "--out", str(again), "--preset",
          "tiny", "--seed", "3"])
    assert json.loads((again / "levels.json").read_text()) == doc
