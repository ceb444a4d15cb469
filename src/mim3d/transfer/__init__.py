"""Export and import of pre-trained encoders (DESIGN.md §5), incl. the authors' released file.

Four concerns, one module each: :mod:`~mim3d.transfer.card` (encoder files, their JSON card and
the report type), :mod:`~mim3d.transfer.export` (a mim3d run's encoder), :mod:`~mim3d.transfer.
official` (the MiM authors' ``.pth``) and :mod:`~mim3d.transfer.loading` (into downstream
networks). This package only re-exports their public names.
"""

from mim3d.transfer.card import (
    FORMAT,
    TransferError,
    TransferReport,
    encoder_from_card,
    read_card,
)
from mim3d.transfer.export import export_encoder
from mim3d.transfer.loading import load_encoder, load_encoder_into, vit_to_monai_key
from mim3d.transfer.official import import_official

__all__ = ["FORMAT", "TransferError", "TransferReport", "encoder_from_card", "export_encoder",
           "import_official", "load_encoder", "load_encoder_into", "read_card",
           "vit_to_monai_key"]
