"""The calibration commands, one module each (profile, kl_scan, layer_sensitivity, failure_probe, eval,
import_usage), on the skeleton in `common.py`; eval's settings and rows are in `eval_rows.py`, the
serving dumps import-usage reads in `usage_dumps.py`."""
