"""Export fitted detectors to ONNX, for :mod:`vlad.runtime` (onnxruntime + numpy, no torch).

>>> det.export("exported/", format="onnx")        # doctest: +SKIP
>>> from vlad import runtime
>>> runtime.load("exported/").predict(["a.png"])   # doctest: +SKIP

Modules: :mod:`~vlad.export.graphs` (each scorer's prediction as a torch module),
:mod:`~vlad.export.onnx` (torch -> ONNX with a dynamic batch), :mod:`~vlad.export.detector` (the folder:
one graph per scorer plus ``manifest.json`` with fusion, calibration and thresholds).
"""

from vlad.export.detector import FORMATS, export_detector

__all__ = ["FORMATS", "export_detector"]
