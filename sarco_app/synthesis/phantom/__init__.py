"""Synthetic axial CT slices of the abdomen at L1-L4 with exact body-composition labels.

No public expert labels of muscle / SAT / VAT / IMAT exist, so these phantoms are the training
and test bed of the segmentation network, which must then work on real CT. Following the
SynthSeg idea, every anatomical size, shape and intensity is strongly randomised; the anatomy is
nonetheless laid out like a real slice at the lumbar level:

* body outline with a thin dense skin, subcutaneous fat (SAT) whose thickness varies around the
  body (fibrous septa, Scarpa's fascia, umbilicus), lying on a curved CT table or foam pad;
* abdominal wall muscles as layered bands (rectus pair beside the linea alba; external oblique,
  internal oblique and transversus abdominis with thin fat planes between them), latissimus
  dorsi higher up, psoas, quadratus lumborum and erector spinae / multifidus pairs;
* a lumbar vertebra (cortical shell, cancellous body, pedicles, laminae, spinous, articular and
  transverse processes, spinal canal), ribs at L1-L2;
* kidneys (hilum with sinus fat and pelvis), liver, spleen, stomach, pancreas, duodenum,
  gallbladder where the level makes them plausible, aorta (with calcified plaque) and IVC,
  iliac vessels at L4, mesenteric vessels, colon and small-bowel loops with gas (air-fluid
  levels in the scanner's vertical), fluid, oral contrast or faeces; visceral fat between them;
* fat specks and streaks inside the muscles (IMAT), lower muscle HU with myosteatosis;
* realistic HU per tissue for a random contrast phase, smooth tissue texture, partial-volume
  blur, correlated CT noise, occasional lateral streaks, the arms beside the body, a circular
  reconstruction field of view with padding outside, and truncation of wide bodies.

Geometry is drawn in patient millimetres (``u`` toward the patient's left, ``v`` toward
posterior) and rasterised on the pixel grid through a random rotation and shift. The label map
comes from that partial-volume-free tissue map; intensities, blur and noise are added on top.
Pixels coarser than 1.1 mm are rendered on a 2-4x finer grid: the image is the average over
each output pixel (partial volume of skin, fascia, fat planes) and the anatomical label the
majority class. The muscle attenuation is adjusted after blurring so that the median HU inside
the muscle label equals ``muscle_hu``. The returned ``label`` then follows the clinical protocol
(outline, then threshold): inside the muscle compartment, muscle is -29..150 HU and IMAT
-190..-30 HU of the final image; SAT and VAT outside -190..-30 HU (fibrous septa, partial volume
with skin or organs) are background. ``anatomical_label`` keeps the majority map.

Label values are those of :mod:`sarco_app.labels`: 1 skeletal muscle of the trunk (arms are not
part of the L3 measurement and stay 0), 2 SAT (fat between skin and the outer fascia of the
muscle wall / back muscles), 3 VAT (fat inside the muscle wall: intra-abdominal and
retroperitoneal, renal sinus), 4 IMAT (fat inside muscle fascia, including the thin planes
between the abdominal wall layers); everything else is 0 (skin, fascia and septa, bone, organs,
bowel, vessels, epidural fat, air, table).

Arrays are returned in the canonical orientation of ``docs/CONVENTIONS.md``: shape ``(X, Y)``,
axis 0 toward the patient's left, axis 1 toward posterior, so ``hu.T`` is the radiological view.

Layout of the package (one job per module; the order of random draws is part of every phantom,
so new random structures go at the end of a stream):

* :mod:`.tissues`: tissue classes of the tissue map, their labels and organ classes, and the
  per-level anatomy tables (the place to tune a level);
* :mod:`.geometry`: the pixel grid (patient mm -> pixels) and random shape helpers;
* :mod:`.plan`: the request checks, the Martin 2013 cut-offs, and :class:`~.plan.Plan`, every
  patient and body parameter drawn before any pixel exists;
* :mod:`.anatomy`: painting the tissue map from the plan (surface, musculoskeletal, viscera);
* :mod:`.render`: tissue map -> HU (intensities, texture, blur, supersampling, noise, streaks);
* :mod:`.build`: :func:`generate`, which chains the above and derives the labels;
* :mod:`.writing`: NIfTI / DICOM files, cohorts and their manifest.
"""

from sarco_app.synthesis.phantom.build import Phantom, generate
from sarco_app.synthesis.phantom.plan import (
    DEFAULT_SPACING_RANGE, LEVELS, LUMBAR_LEVELS, SIZE_LIMITS, SPACING_LIMITS, TISSUES, smi_cutoff,
)
from sarco_app.synthesis.phantom.writing import FORMATS, MANIFEST_COLUMNS, write_cohort, write_phantom

__all__ = [
    "DEFAULT_SPACING_RANGE", "FORMATS", "LEVELS", "LUMBAR_LEVELS", "MANIFEST_COLUMNS", "SIZE_LIMITS",
    "SPACING_LIMITS", "TISSUES", "Phantom", "generate", "smi_cutoff", "write_cohort", "write_phantom",
]
