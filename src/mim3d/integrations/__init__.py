"""Hand-offs to the tools users already train with (DESIGN.md section 9).

* :mod:`mim3d.integrations.nnunet` - nnU-Net v2: a plans variant naming
  :class:`mim3d.models.nnunet_net.MiMnnUNet` and a ``-pretrained_weights`` file.
* :mod:`mim3d.integrations.nnunet_data` - phantom datasets in nnU-Net's raw layout and nnU-Net's
  commands run as subprocesses (tests, benchmarks).

The Hugging Face layout lives in :mod:`mim3d.hub`.
"""
