"""Pictures of CT volumes, MiM levels, reconstructions and label maps.

Every picture follows the radiological display convention with anatomical markers
(:mod:`mim3d.viz.planes`), writes its HU window on the figure and tints masked regions so they
never read as air. matplotlib is imported lazily and only through its object API (no pyplot),
so importing mim3d never touches the user's plotting backend and figures render headless (Agg).
"""

from __future__ import annotations

from mim3d.viz.levels import MASK_RGBA, levels_figure, save_levels_png
from mim3d.viz.overlay import label_colour, label_overlay_figure, save_label_overlay
from mim3d.viz.planes import VIEWS, View, display_plane, hu_window_of, window_caption
from mim3d.viz.reconstruction import (
    MASK_FILL,
    parse_volume_id,
    reconstruction_picture,
    reconstruction_volumes,
    save_inpainting_png,
    save_reconstruction_png,
)

__all__ = ["MASK_FILL", "MASK_RGBA", "VIEWS", "View", "display_plane", "hu_window_of",
           "label_colour", "label_overlay_figure", "levels_figure", "parse_volume_id",
           "reconstruction_picture", "reconstruction_volumes", "save_inpainting_png",
           "save_label_overlay", "save_levels_png", "save_reconstruction_png", "window_caption"]
