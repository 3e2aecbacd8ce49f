"""fpe-node: a DICOM node that predicts the first-pass effect of thrombectomy.

Research use only, not for diagnosis.
"""

__version__ = "0.1.0"
