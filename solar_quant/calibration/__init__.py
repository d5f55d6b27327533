"""Calibration sets: templates, source readers, sampling, and the saved artifact."""
