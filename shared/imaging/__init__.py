"""Imaging: reading scans (DICOM, NIfTI) and site folders, the intracranial mask, the crop, lesion volumetrics and plausibility flags."""
