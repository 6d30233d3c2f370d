"""Synthetic CT volumes of the lower thorax, abdomen and pelvis with vertebra labels as truth.

The phantoms exist to develop and test the L3 locator (:mod:`sarco_app.spine.l3`) without patient
data. They are simple, but carry everything a vertebra-counting method looks at:

* a trunk outline with subcutaneous fat, an abdominal muscle wall, paraspinal muscles and psoas,
  visceral fat with low-contrast organ and bowel blobs (some with gas) and lung bases;
* a curved spine (lumbar lordosis, thoracic kyphosis) of tilted vertebral bodies with a cortical
  shell, cancellous core and endplates, intervertebral discs and posterior elements (neural
  arch, spinous and transverse processes);
* rib pairs on the thoracic vertebrae that run posterolaterally, curve around the trunk and
  descend anteriorly (the 11th and 12th are short floating ribs);
* a curved sacrum with alae meeting the iliac wings at the sacro-iliac joints, iliac wings from
  the crest (near the L4/L5 disc) down to the acetabulum, and femoral heads.

Anatomical variants occur at roughly their published rates and are recorded in the truth:
11 or 13 rib pairs (no ribs on T12 / short ribs on L1), a lumbarised S1 (a free sixth
lumbar-type vertebra) and a sacralised L5 (L5 fused to the sacrum).

All geometry is in millimetres in the canonical frame of :mod:`sarco_app.inputs.ingest`: x toward the
patient's left, y toward posterior, z toward superior. ``make_volume_phantom`` returns a
canonical :class:`~sarco_app.inputs.ingest.CTImage` and a :class:`VolumeTruth` whose z values are world
millimetres (``image.affine``) and whose slice indices are canonical.

Layout of the package (one job per module; the order of random draws is part of every phantom):

* :mod:`.spine`: vertebra names, labels and variant rates, :class:`~.spine.Vertebra`, the spine
  (bodies, sacrum, landmarks) and rib centre lines;
* :mod:`.render`: one axial plane of soft tissue and bone, and the rib tubes;
* :mod:`.build`: :func:`~.build.make_volume_phantom` (draws, renders and adds noise) and
  :class:`~.build.VolumeTruth`;
* :mod:`.writing`: thick-slice resampling, NIfTI (+ truth sidecar) and DICOM series files.
"""
