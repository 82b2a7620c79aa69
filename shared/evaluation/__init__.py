"""Evaluation: classification metrics and thresholds, ROC statistics (DeLong, pooling, meta-analysis), calibration."""
