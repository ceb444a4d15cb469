"""Losses of pre-training: MiM's masked reconstruction, cross-level alignment and level
weights, and the Swin-UNETR SSL baseline's rotation + contrastive + inpainting loss.

Three concerns, one module each: :mod:`~mim3d.losses.mim` (reconstruction, InfoNCE / BYOL
alignment and the total MiM loss, with the conventions of DESIGN.md §1),
:mod:`~mim3d.losses.schedules` (level-weight schedules) and :mod:`~mim3d.losses.swin_ssl` (the
Swin-UNETR SSL baseline). All are pure functions of tensors that never import model code. This
package only re-exports their public names.
"""

from mim3d.losses.mim import (
    ALIGNMENTS,
    LevelOutputLike,
    MiMOutputLike,
    byol_alignment,
    infonce_alignment,
    mim_loss,
    reconstruction_loss,
)
from mim3d.losses.schedules import LEVEL_SCHEDULES, level_weights
from mim3d.losses.swin_ssl import SwinSSLOutputLike, nt_xent, swin_ssl_loss

__all__ = ["ALIGNMENTS", "LEVEL_SCHEDULES", "LevelOutputLike", "MiMOutputLike",
           "SwinSSLOutputLike", "byol_alignment", "infonce_alignment", "level_weights",
           "mim_loss", "nt_xent", "reconstruction_loss", "swin_ssl_loss"]
