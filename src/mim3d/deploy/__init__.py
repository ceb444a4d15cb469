"""Deployment of fine-tuned runs: ONNX / TorchScript / MONAI bundle export, the ONNX Runtime
network used by ``mim3d predict --model model.onnx``, DICOM SEG writing and reading, and the
prediction report.

Layering: :mod:`~mim3d.deploy.onnx_model`, :mod:`~mim3d.deploy.dicomseg` and
:mod:`~mim3d.deploy.report` depend only on data-level code (the prediction engine imports them);
:mod:`~mim3d.deploy.export` and :mod:`~mim3d.deploy.bundle` sit above the engine (they load runs).
"""
