"""Static pickle scanning and the guarded loading of legacy pickled models."""

from .legacy import load_pickled_model
from .policy import Severity
from .scanner import Finding, ScanReport, scan

__all__ = [
    "Finding",
    "ScanReport",
    "Severity",
    "load_pickled_model",
    "scan",
]
