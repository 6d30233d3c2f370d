"""Inputs: reading a patient's CT into the library's one representation and checking it.

Loads DICOM series (plain or compressed), NIfTI and label files into HU arrays with spacing and
affine (``ingest``), reads and writes label maps as DICOM SEG (``dicom_seg``), talks to a
DICOMweb PACS (``pacs``) and bounds what an input may cost before it is read (``limits``).
"""
