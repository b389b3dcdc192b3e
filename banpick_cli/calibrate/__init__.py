"""Calibration passes: usage counts, the shared KL engine, layer/token sensitivity, failure probe."""
