"""Tiny fine-tuning runs shared by tests/test_deploy.py and tests/test_predict.py.

One segmentation run is trained for two steps on two 40^3 phantoms and kept in the session's
base temp folder, so both modules reuse it (it is built by whichever asks first). The other
networks get runs of freshly seeded weights written in the run-folder layout (exporting does not
depend on training). Spacing 4.5 mm: the real test CTs (3 mm) then map back from the model grid
without exact nearest-neighbour ties (see mim3d.engine.bundle on tie rules).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from mim3d.config import config_from_dict, load_config, save_config
from mim3d.data.phantom import write_cohort
from mim3d.engine.checkpoint import save_checkpoint
from mim3d.engine.downstream_run import build_network
from mim3d.engine.finetune import finetune

LABELS = {"0": "background", "1": "spleen", "6": "liver"}
FAST = ("optim.total_steps=2", "optim.warmup_steps=1", "optim.lr=1e-3", "task.roi=[32,32,32]",
        "data.spacing=[4.5,4.5,4.5]", "task.sw_overlap=0.25", "task.num_samples=1",
        "train.workers=0", "train.log_every=1", "train.ckpt_every=2")
CT_SMALL = "ct/totalseg_example_ct_sm.nii.gz"
CT_DICOM = "ct/totalseg_example_ct_dicom"


def seg_run(factory: pytest.TempPathFactory) -> Path:
    """The shared 2-step MiM-UNETR run (spleen 1, liver 6), built on first use."""
    root = factory.getbasetemp() / "deploy_seg_run"
    run = root / "run"
    if (run / "best").is_dir():
        return run
    shutil.rmtree(root, ignore_errors=True)
    raw = json.loads(write_cohort(root / "cohort", 2, seed=0, shape=(40, 40, 40),
                                  spacing=(4.0, 4.0, 4.0)).read_text())
    raw["labels"] = LABELS
    data = root / "cohort" / "datalist.json"
    data.write_text(json.dumps(raw))
    cfg = load_config("downstream", "btcv", overrides=list(FAST))
    finetune(cfg, data=data, out=run, size="tiny", val_every=2, progress=False)
    return run


def network_run(base: Path, out: Path, network: str, roi: tuple[int, int, int], *,
                lora_rank: int | None = None) -> Path:
    """A run folder for ``network`` with seeded untrained weights (LoRA adapters of
    ``lora_rank`` when given, with non-zero B so that merging matters), from the seg run."""
    spec = json.loads((base / "finetune.json").read_text())
    cfg = config_from_dict("downstream", yaml.safe_load((base / "config.yaml").read_text()))
    if network == "classifier":
        cls = load_config("downstream", "cc-ccii", overrides=["data.spacing=[4.5,4.5,4.5]"])
        cfg = replace(cls, task=replace(cls.task, roi=roi))
        spec.update(task="cls", num_classes=2, classes={"0": "no", "1": "yes"})
    else:
        cfg = replace(cfg, task=replace(cfg.task, roi=roi))
    spec.update(network=network, roi=list(roi), config=None, lora_rank=lora_rank)
    out.mkdir(parents=True)
    (out / "finetune.json").write_text(json.dumps(spec))
    save_config(cfg, out / "config.yaml")
    torch.manual_seed(0)
    model = build_network(spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter)
                param.normal_(0.0, 0.05)
    save_checkpoint(out / "best", step=0, model=model)
    return out
