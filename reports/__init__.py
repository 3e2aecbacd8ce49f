"""DICOM result objects (SR, secondary captures, PDF) built from a prediction (no sockets, no database)."""
