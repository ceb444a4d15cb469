"""Deployment building blocks used by the prediction engine: the ONNX Runtime network behind
``mim3d predict --model model.onnx``, DICOM SEG writing and reading, and the prediction report.

They depend only on data-level code; exporting a run (ONNX / TorchScript / MONAI bundle) loads
the run, so it lives in the engine (:mod:`mim3d.engine.export`, :mod:`mim3d.engine.bundle`).
"""
