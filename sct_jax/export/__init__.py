"""Export: the sCT as a DICOM CT series for a planning system."""
