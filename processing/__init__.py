"""synthmr numerical science: fit, PD, synthesis, segmentation, myelin, enhancement.

Never imports a DICOM library (the import arrow is ``dicom_node -> processing``).
"""

from processing._version import __version__

__all__ = ["__version__"]
