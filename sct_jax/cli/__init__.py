"""Command-line entry points: train, evaluate, QA, DICOM export, ablations."""
