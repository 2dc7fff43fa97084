"""Beyond the paper: from CAMs to masks with image-level labels only, one small class per rule.

The paper's masks (:mod:`postprocess`) min-max scale every map per image and cut it at a fixed
0.3, so every image the classifier passes gets a foreground whatever the evidence (the "threshold
matters" finding of AMN, CVPR 2022), and the maps have 1/32 of the input's resolution: a mask is
a blob where the network looked, not the defect's shape. Each rule here uses nothing but the
images, their labels and the out-of-fold CAMs and probabilities; no parameter is chosen on true
masks.

* :mod:`.region`: where a class's evidence is (the paper's per-image cut, absolute maps cut at
  the negatives' peaks, Otsu's cut; optionally PAR first), one class per rule.
* :mod:`.shape`: what the defect looks like, one class per grey-level rule (departures from the
  image's grey in a sign learnt from the labels).
* :mod:`.technique`: a combination (:class:`RefineConfig`) calibrated then applied
  (:class:`Technique`), as masks or as self-training targets for a segmentation network
  (:func:`segment.confident_labels`: defect, background and an ignored band between).
* :mod:`.maps` and :mod:`.grey`: the maths both use. :mod:`.stage`: the same on a context
  (:func:`refine_stage`, :class:`Refined`).

The paper's exact pipeline stays in :mod:`postprocess`.
"""
from .grey import (SIGNS, Contrast, class_polarity, contrast_departures, departures,  # noqa: F401
                   gaussian_blur, grey_zscore, local_zscore, region_misses)
from .maps import (_neighbours, absolute_maps, absolute_maps_on, class_scales,  # noqa: F401
                   gate, negative_thresholds, otsu_thresholds, par, par_affinity, threshold_masks)
from .region import REGIONS, Region, RegionConfig  # noqa: F401
from .shape import GREY_RULES, GreyConfig, GreyTest  # noqa: F401
from .stage import Refined, guide_images, image_loader, refine_stage  # noqa: F401
from .technique import (Calibration, RefineConfig, Technique, calibrate,  # noqa: F401
                        refine_batches, self_training_targets)
