"""ONNX export verified in onnxruntime before it is written (needs the ``onnx`` extra).

The optional packages (onnx, onnxscript, onnxruntime) are imported only when a function here
runs, so ``import torchkeep`` works without them.
"""

from __future__ import annotations

from ..describe import DESCRIBERS
from ..formats import Format
from .describe import describe_onnx
from .exporter import export_onnx
from .report import OnnxReport, OutputDiff

DESCRIBERS[Format.ONNX] = describe_onnx

__all__ = ["OnnxReport", "OutputDiff", "export_onnx"]
