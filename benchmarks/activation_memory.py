"""What autograd keeps for backward per MiM base sample, by memory option, without a GPU.

The real forward and loss of one 192^3 level-1 sample (21 level volumes, real masks) run under
bf16 autocast on fake tensors (torch's ``FakeTensorMode``: shapes and dtypes, no data, no
memory, seconds). Counted, once per distinct storage: every tensor autograd saves for backward
(``saved_tensors_hooks``), what ``optim.saved_activations=bf16`` packs instead, and the inputs a
recomputed (checkpointed) block keeps for its recompute. Weights are not counted; their bf16
autocast copies are. That is the bulk of a step's memory above weights and optimizer state. A
step's peak adds backward's largest transient (one recomputed piece, gradient buffers), which
only ``benchmarks/gpu_pretrain.py`` on a GPU measures (``peak_gib_per_sample``).

Variants are ``gpu_pretrain.py``'s: ``before`` (level by level, no recompute) and ``after`` with
the CUDA defaults forced (one pass, conv recompute), plus each memory option. CPU autocast runs
matmuls, convs and attention in bf16 as CUDA's does, but LayerNorm in bf16 where CUDA's runs it
in fp32 (so on CUDA a norm's output, and the residual stream after it, is fp32): here
``F.layer_norm`` is made to compute in fp32 under autocast, as on CUDA. The loss's index-range
checks read values, which fake tensors lack, so they are skipped here.

    PYTHONPATH=src .venv/bin/python benchmarks/activation_memory.py     # ~30 s, CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from gpu_pretrain import AFTER, BEFORE, MEMORY, QUICK, Variant
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

import mim3d.engine.train as train_mod
import mim3d.losses.mim as loss_mod
import mim3d.models.decoder as decoder_mod
import mim3d.models.hybrid as hybrid_mod
import mim3d.models.vit as vit_mod
from mim3d.config import load_config
from mim3d.factory import build_pretrain_model, geometry_from_config
from mim3d.masking import sample_levels

RESULT_FILE = Path(__file__).resolve().parent / "results" / "activation_memory.json"
CUDA_DEFAULTS = ("model.one_pass=always", "optim.conv_recompute=always")
GIB = 2.0**30


class _Tally:
    """Bytes of distinct non-weight storages, by dtype."""

    def __init__(self, weights: set[int]) -> None:
        self.weights, self.seen = weights, {}

    def add(self, t: Tensor) -> None:
        key = t.untyped_storage()._cdata
        if key not in self.weights:
            self.seen[key] = (t.untyped_storage().nbytes(), str(t.dtype).removeprefix("torch."))

    def by_dtype(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for nbytes, dtype in self.seen.values():
            out[dtype] = out.get(dtype, 0.0) + nbytes / GIB
        return out


@contextmanager
def _counting(tally: _Tally) -> Iterator[None]:
    """Count saved tensors, bf16-packed ones and checkpoint inputs while the forward runs."""
    pack_bf16, layer_norm = train_mod._pack_bf16, F.layer_norm

    def fp32_norm(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:  # CUDA autocast's policy
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return layer_norm(x.float(), *args, **kwargs)
        return layer_norm(x, *args, **kwargs)

    def packed(t: Tensor) -> tuple[Tensor, torch.dtype | None]:
        out = pack_bf16(t)
        tally.add(out[0])
        return out

    def checkpointed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        for a in args:
            if isinstance(a, Tensor):
                tally.add(a)
        return checkpoint(fn, *args, **kwargs)

    def saved(t: Tensor) -> Tensor:
        tally.add(t)
        return t

    patches = [(train_mod, "_pack_bf16", packed), (F, "layer_norm", fp32_norm),
               # reads values, which fake tensors have none of
               (loss_mod, "_check_alignment_inputs", lambda *a: None),
               *((mod, "checkpoint", checkpointed) for mod in (hybrid_mod, decoder_mod, vit_mod))]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
    for mod, name, fn in patches:
        setattr(mod, name, fn)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t):
            yield
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)


def saved_gib(preset: str, overrides: tuple[str, ...], variant: Variant) -> dict[str, Any]:
    """GiB kept for backward by one sample's forward + loss, in total and by dtype."""
    extra = () if variant is BEFORE else CUDA_DEFAULTS
    cfg = load_config("pretrain", preset, overrides=[*overrides, "optim.precision=bf16",
                                                     *extra, *variant.overrides,
                                                     "optim.batch_size=1"])
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)  # real init (it reads values), then made fake below
    masks = sample_levels(1, geometry_from_config(cfg.geometry), torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device=cpu)
        tally = _Tally({p.untyped_storage()._cdata for p in model.parameters()})
        x = torch.empty(1, 1, *cfg.geometry.crop_sizes[0])
        with _counting(tally), train_mod.autocast_context(cpu, "bf16"), \
                train_mod.saved_activations_context(cfg.optim.saved_activations):
            train_mod.compute_losses(model(x, masks), cfg, 0)
    dtypes = tally.by_dtype()
    return {"variant": variant.name, "saved_gib": sum(dtypes.values()), "by_dtype": dtypes,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    """Count every variant, print RESULT lines, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="gpu_pretrain's shrunk tiny preset")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"result JSON (default {RESULT_FILE}; --quick writes none by default)")
    args = ap.parse_args(argv)
    preset, overrides = ("tiny", QUICK["overrides"]) if args.quick else ("base", ())
    rows = [saved_gib(preset, overrides, v) for v in (BEFORE, AFTER, *MEMORY)]
    after = rows[1]["saved_gib"]
    res = {f"saved_gib_per_sample_{r['variant']}": r["saved_gib"] for r in rows}
    res["saved_after_vs_before"] = after / rows[0]["saved_gib"]
    for key, value in res.items():
        print(f"RESULT {key} {value:.4g}")
    out = args.out or (None if args.quick else RESULT_FILE)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "preset": preset,
               "machine": {"torch": torch.__version__, "python": platform.python_version(),
                           "device": "none (fake tensors on the CPU)"},
               "results": res, "rows": rows}
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
