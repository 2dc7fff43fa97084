"""The paper's, thesis's and brief's reference numbers, printed beside ours.

This module is the repository's only copy of them: quoted from the paper (Sydorskyi 2022), the
thesis that accompanies it, and the project's brief (measured statistics of real Severstal images);
none of those texts is part of this repository.

These are quotations, not results: every table that shows one of them says so in its column name.
"""

# Paper, section III: the Kaggle Severstal training set.
TOTAL_IMAGES = 12568
DEFECT_FREE_IMAGES = 5473
DEFECTIVE_IMAGES = 7095
# "images containing each class"; they add up to 7,095 = the number of masks (rows of the current
# train.csv), so the paper's 7,095 "defective images" counts masks, not images (see the EDA notebook).
CLASS_COUNTS = {"1": 897, "2": 247, "3": 5150, "4": 801}
IMAGE_SIZE = (256, 1600)
# Thesis: defective images by number of classes.
CLASSES_PER_IMAGE = {1: 6239, 2: 425, 3: 2}

# Brief, section 4: statistics measured on real Severstal training images.
TEXTURE_RANGES = {
    "mean intensity": (43, 110),
    "intensity std": (24, 46),
    "mean |horizontal neighbour difference|": (4, 8),
    "mean |vertical neighbour difference|": (4, 10),
    "near-black share (<20)": (0.0, 0.30),
}
MASK_AREA_NOTES = {
    "1": "around 1,000-3,000 px",
    "2": "a few thousand px",
    "3": "a few thousand to ~100,000 px",
    "4": "tens of thousands of px",
}

# Paper, Table 1: ROC-AUC per class on the union of the CV folds.
TABLE1 = {
    "EfficientNet-b0 + HFlip": (0.9938, 0.9917, 0.9886, 0.9974),
    "EfficientNet-b3 + HFlip + VFlip": (0.9970, 0.9932, 0.9932, 0.9962),
    "EfficientNet-b3 + HFlip": (0.9970, 0.995, 0.9921, 0.9960),
}

# Paper, Table 2: Dice (defective images, union of CV folds) of masks straight from CAMs.
TABLE2 = {
    "Grad-CAM": 0.382956,
    "Grad-CAM++": 0.440810,
    "Grad-CAM++ + SWA + aug smooth": 0.452208,
    "Grad-CAM++ + SWA + aug smooth, b3 + HFlip + VFlip": 0.379971,
    "Grad-CAM++ + SWA + aug smooth, b3 + HFlip": 0.386530,
    "Grad-CAM++ + SWA + aug smooth, confidence=0.5, min_seg_len=0, threshold=0.3": 0.465,
}
PAPER_POSTPROCESS = {"confidence": 0.5, "threshold": 0.3, "min_area": 0}

# Paper, Table 3: masks straight from CAMs vs U-Net (EfficientNet-b0 encoder).
TABLE3 = {
    "CAM masks (Grad-CAM++ + improvements)": 0.465,
    "U-Net on true masks (threshold 0.2, min_seg_len 0)": 0.621,
    "U-Net on CAM masks (threshold 0.2, min_seg_len 0)": 0.418,
}

# Thesis, Table 4 (and its per-model tables for the non-empty "dice full mask"): U-Nets trained on
# the defective images only; "all" = Dice over every mask of the defective test images.
TABLE4 = {
    "U-Net BCE": dict(all=0.74, classes=(0.77, 0.96, 0.48, 0.74), full=0.49,
                      full_classes=(0.22, 0.12, 0.56, 0.66), lost=""),
    "U-Net with ResNet encoder BCE": dict(all=0.79, classes=(0.88, 0.96, 0.53, 0.79), full=0.52,
                                          full_classes=(0.34, 0.3, 0.6, 0.67), lost=""),
    "ResNet encoder-decoder BCE": dict(all=0.87, classes=(0.86, 0.96, 0.6, 0.92), full=0.49,
                                       full_classes=(0.0, 0.0, 0.6, 0.51), lost="1, 2"),
    "U-Net CCE": dict(all=0.84, classes=(0.88, 0.96, 0.6, 0.94), full=0.59,
                      full_classes=(0.38, 0.0, 0.66, 0.57), lost="2"),
    "U-Net with ResNet encoder CCE": dict(all=0.77, classes=(0.88, 0.97, 0.56, 0.88), full=0.40,
                                          full_classes=(0.0, 0.0, 0.46, 0.5), lost="1, 2"),
    "ResNet encoder-decoder CCE": dict(all=0.76, classes=(0.75, 0.89, 0.52, 0.9), full=0.54,
                                       full_classes=(0.42, 0.39, 0.55, 0.65), lost=""),
    "U-Net Focal loss": dict(all=0.81, classes=(0.77, 0.96, 0.6, 0.9), full=0.60,
                             full_classes=(0.45, 0.4, 0.62, 0.64), lost=""),
    "U-Net with ResNet encoder Focal loss": dict(all=0.49, classes=(0.74, 0.78, 0.29, 0.16),
                                                 full=0.33, full_classes=(0.12, 0.11, 0.28, 0.28),
                                                 lost="(low quality overall)"),
    "ResNet encoder-decoder Focal loss": dict(all=0.76, classes=(0.87, 0.96, 0.34, 0.87), full=0.32,
                                              full_classes=(0.0, 0.0, 0.35, 0.49), lost="1, 2"),
}
