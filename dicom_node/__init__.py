"""synthmr DICOM node: receive, normalize, orchestrate, export and deliver."""

from processing._version import __version__

__all__ = ["__version__"]
