"""Small DICOM slices written with pydicom, for the tests of your own images (pydicom is in the test extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_ct_slice(path: Path, stored: np.ndarray, intercept: float = -1024.0, slope: float = 1.0) -> None:
    """A one-slice CT DICOM file: ``stored`` int16 values, Hounsfield units = stored x slope + intercept."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test^Phantom", "0"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = stored.astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
