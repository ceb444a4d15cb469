"""Tests of mim3d.data.datalists: datalist JSON, nnU-Net folders, text lists, folder scans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mim3d.data.datalists import (
    CaseSpec,
    case_name,
    load_datalist,
    load_nnunet_folder,
    parse_label_map,
    resolve_inputs,
)


def _touch(*paths: Path) -> None:
    """Create empty files (resolving inputs never opens images)."""
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def _fake_dicom(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 16)


def test_msd_datalist_relative_paths_labels_and_variants(tmp_path: Path) -> None:
    _touch(tmp_path / "imagesTr" / "spleen_2.nii.gz", tmp_path / "labelsTr" / "spleen_2.nii.gz")
    _touch(tmp_path / "imagesTr" / "spleen_3.nii.gz", tmp_path / "imagesTs" / "spleen_1.nii.gz")
    doc = {
        "labels": {"0": "background", "1": "spleen"},
        "training": [
            {"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"},
            {"image": ["imagesTr/spleen_3.nii.gz", "imagesTr/other_channel.nii.gz"]},
        ],
        "test": ["imagesTs/spleen_1.nii.gz"],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(doc))
    cases, labels = load_datalist(tmp_path / "dataset.json")
    assert labels == {0: "background", 1: "spleen"}
    assert cases == [
        CaseSpec(
            "spleen_2",
            str(tmp_path / "imagesTr" / "spleen_2.nii.gz"),
            str(tmp_path / "labelsTr" / "spleen_2.nii.gz"),
        ),
        CaseSpec("spleen_3", str(tmp_path / "imagesTr" / "spleen_3.nii.gz"), None),
    ]
    # the MSD task folder itself (same layout as nnU-Net) gives the same cases
    assert resolve_inputs([tmp_path]) == cases
    test_cases, _ = load_datalist(tmp_path / "dataset.json", key="test")
    assert test_cases == [CaseSpec("spleen_1", str(tmp_path / "imagesTs" / "spleen_1.nii.gz"))]
    with pytest.raises(ValueError, match="no 'validation' list.*keys are"):
        load_datalist(tmp_path / "dataset.json", key="validation")


def test_datalist_base_dir_and_wrong_base_dir(tmp_path: Path) -> None:
    _touch(tmp_path / "data" / "a.nrrd")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "dl.json").write_text(json.dumps({"basedir": "../data", "training": ["a.nrrd"]}))
    cases, labels = load_datalist(lists / "dl.json")
    assert cases == [CaseSpec("a", str(tmp_path / "data" / "a.nrrd"))] and labels == {}
    (lists / "bad.json").write_text(json.dumps({"base_dir": "nowhere", "training": ["a.nrrd"]}))
    with pytest.raises(ValueError, match="none of the 1 images exists"):
        load_datalist(lists / "bad.json")
    (lists / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_datalist(lists / "broken.json")


def test_parse_label_map_styles() -> None:
    assert parse_label_map({"background": 0, "liver": 1, "tumour": "2"}) == {
        0: "background",
        1: "liver",
        2: "tumour",
    }
    assert parse_label_map({"1": "spleen", "0": "background"}) == {0: "background", 1: "spleen"}
    assert parse_label_map({"background": 0, "whole tumor": [1, 2, 3], "edema": 1}) == {
        0: "background",
        1: "edema",
    }
    assert parse_label_map(["background", "liver"]) == {0: "background", 1: "liver"}
    assert parse_label_map(None) == {}
    with pytest.raises(ValueError, match="no integer id"):
        parse_label_map({"liver": "big"})


def _nnunet(root: Path) -> Path:
    doc = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    _touch(root / "imagesTr" / "liver_001_0000.nii.gz", root / "imagesTr" / "liver_001_0001.nii.gz")
    _touch(
        root / "imagesTr" / "liver_000_0000.nii.gz", root / "imagesTr" / "._liver_000_0000.nii.gz"
    )
    _touch(root / "labelsTr" / "liver_000.nii.gz", root / "imagesTs" / "liver_009_0000.nii.gz")
    root.mkdir(exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(doc))
    return root


def test_nnunet_folder(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset003_Liver")
    cases, labels = load_nnunet_folder(root)
    assert labels == {0: "background", 1: "liver"}
    assert cases == [
        CaseSpec(
            "liver_000",
            str(root / "imagesTr" / "liver_000_0000.nii.gz"),
            str(root / "labelsTr" / "liver_000.nii.gz"),
        ),
        CaseSpec("liver_001", str(root / "imagesTr" / "liver_001_0000.nii.gz"), None),
    ]
    assert resolve_inputs([root]) == cases
    assert resolve_inputs([root / "dataset.json"]) == cases  # v2 json has no "training" list


def test_text_file_with_comments_blank_lines_and_relative_paths(tmp_path: Path) -> None:
    _touch(tmp_path / "imgs" / "b.mha", tmp_path / "imgs" / "a.nii", tmp_path / "abs.mhd")
    _fake_dicom(tmp_path / "series1" / "IM0001")
    lst = tmp_path / "lists" / "cases.txt"
    lst.parent.mkdir()
    lst.write_text(
        f"# my cases\n\n../imgs/b.mha\n  ../imgs/a.nii  \n{tmp_path / 'abs.mhd'}\n../series1\n"
    )
    cases = resolve_inputs([lst])
    assert [c.name for c in cases] == ["b", "a", "abs", "series1"]
    assert cases[3].image == str(tmp_path / "series1")
    lst.write_text("../imgs/missing.nii.gz\n")
    with pytest.raises(ValueError, match=r"cases.txt:1: listed path not found"):
        resolve_inputs([lst])
    lst.write_text("cases.txt\n")
    with pytest.raises(ValueError, match="includes itself"):
        resolve_inputs([lst])


def test_recursive_scan(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    _touch(root / "p2" / "scan.NRRD", root / "p1" / "ct.nii.gz", root / "p1" / "notes.txt")
    _touch(root / ".hidden" / "x.nii.gz", root / "p1" / ".ct.nii.gz", root / "top.mha")
    _touch(root / "p1" / "scan.mhd", root / "p1" / "scan.raw", root / "meta.json")
    _fake_dicom(root / "p3" / "dicom" / "1.dcm")
    _fake_dicom(root / "p3" / "dicom" / "2.dcm")
    _nnunet(root / "nn")
    cases = resolve_inputs([root])
    images = [Path(c.image).relative_to(root).as_posix() for c in cases]
    assert images == [
        "nn/imagesTr/liver_000_0000.nii.gz",
        "nn/imagesTr/liver_001_0000.nii.gz",
        "p1/ct.nii.gz",
        "p1/scan.mhd",
        "p2/scan.NRRD",
        "p3/dicom",
        "top.mha",
    ]
    assert [c.name for c in cases] == [
        "liver_000",
        "liver_001",
        "ct",
        "scan",
        "scan_2",
        "dicom",
        "top",
    ]
    assert cases[0].label == str(root / "nn" / "labelsTr" / "liver_000.nii.gz")
    assert resolve_inputs([root]) == cases  # deterministic


def test_names_are_safe_and_deduplicated(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "ct.nii.gz", tmp_path / "b" / "CT.nii.gz", tmp_path / "ct_2.nii")
    _touch(tmp_path / "weird name (1).nii.gz", tmp_path / "c" / "ct.nii.gz")
    inputs = [
        tmp_path / "a" / "ct.nii.gz",
        tmp_path / "ct_2.nii",
        tmp_path / "b" / "CT.nii.gz",
        tmp_path / "c" / "ct.nii.gz",
        tmp_path / "weird name (1).nii.gz",
        tmp_path / "a" / "ct.nii.gz",
    ]  # the repeat is dropped
    names = [c.name for c in resolve_inputs(inputs)]
    assert names == ["ct", "ct_2", "CT_3", "ct_4", "weird_name_1_"]
    assert case_name("/x/.hidden.nii.gz") == "hidden"
    assert case_name("/x/series.1") == "series.1"


def test_missing_and_unsupported_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input not found: .*nope") as err:
        resolve_inputs([tmp_path / "nope"])
    assert "\n" not in str(err.value)
    (tmp_path / "x.png").write_bytes(b"png")
    with pytest.raises(ValueError, match="unsupported input"):
        resolve_inputs([tmp_path / "x.png"])
    _fake_dicom(tmp_path / "s" / "one.dcm")
    with pytest.raises(ValueError, match="single DICOM file"):
        resolve_inputs([tmp_path / "s" / "one.dcm"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        resolve_inputs([tmp_path / "empty"])


def test_single_path_and_real_shared_data(shared_data: Path) -> None:
    cases = resolve_inputs(str(shared_data / "ct"))  # a lone str is taken as one input
    names = [c.name for c in cases]
    assert "totalseg_example_ct" in names and "totalseg_example_ct_dicom" in names
    dicom = cases[names.index("totalseg_example_ct_dicom")]
    assert dicom.image == str(shared_data / "ct" / "totalseg_example_ct_dicom")
    assert len(cases) == 8 and all(c.label is None for c in cases)
