"""How much of a masked level-3 token's input is linearly recoverable from the visible tokens.

Level-3 volumes are 16^3 native voxels upsampled (trilinear) to the 96^3 encoder input, so a
token (16^3 input voxels) straddles native voxels shared with its neighbours. On white noise
(native voxels i.i.d.), the share of a masked token's variance explained by the best linear
predictor from every visible input voxel is the fraction of its energy inside the row space of
the visible view. Prints ``RESULT level3_masked_token_linear_recoverable`` (raw and with the token
mean removed, as the norm_pix target centres it) and writes benchmarks/results/level3_leak.json.

Usage: ``python benchmarks/level3_leak.py [--seed 0]`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

NATIVE, INPUT, PATCH, RATIO = 16, 96, 16, 0.6


def upsample_operator() -> sp.csr_matrix:
    """(INPUT^3, NATIVE^3) sparse matrix of the separable trilinear upsampling (C order)."""
    eye = torch.eye(NATIVE)[:, None, :]
    u = F.interpolate(eye, size=INPUT, mode="linear", align_corners=False)[:, 0, :].T.numpy()
    us = sp.csr_matrix(u)
    return sp.kron(sp.kron(us, us), us).tocsr()


def measure(seed: int) -> dict[str, float]:
    """Mean explained-variance share over the masked tokens of one seeded mask."""
    a = upsample_operator()
    g = INPUT // PATCH
    n_tok = g ** 3
    n_mask = int(np.floor(RATIO * n_tok + 0.5))
    masked = np.zeros(n_tok, bool)
    masked[np.random.default_rng(seed).permutation(n_tok)[:n_mask]] = True
    idx = np.arange(INPUT) // PATCH
    token_of = ((idx[:, None, None] * g + idx[None, :, None]) * g + idx[None, None, :]).ravel()
    visible = a[np.nonzero(~masked[token_of])[0]]
    w, v = np.linalg.eigh((visible.T @ visible).toarray())
    basis = v[:, w > w.max() * 1e-10]  # row space of the visible view
    raw, centred = [], []
    for t in np.nonzero(masked)[0]:
        at = a[np.nonzero(token_of == t)[0]]
        av = at @ basis
        n = at.shape[0]
        num, den = float((av ** 2).sum()), float(at.multiply(at).sum())
        raw.append(num / den)
        m_av, m_a = av.mean(0), np.asarray(at.mean(0)).ravel()
        centred.append((num - n * float((m_av ** 2).sum())) / (den - n * float((m_a ** 2).sum())))
    return {"masked_tokens": n_mask, "tokens": n_tok, "raw": float(np.mean(raw)),
            "token_mean_removed": float(np.mean(centred))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seeds the level-3 mask")
    parser.add_argument("--out", default="benchmarks/results/level3_leak.json",
                        help="JSON to write")
    args = parser.parse_args()
    res = measure(args.seed)
    print(f"RESULT level3_masked_token_linear_recoverable {res['raw']:.4f}")
    print(f"RESULT level3_masked_token_linear_recoverable_centred {res['token_mean_removed']:.4f}")
    res.update(seed=args.seed, machine=platform.platform(), processor=platform.processor(),
               cpus=torch.get_num_threads())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
