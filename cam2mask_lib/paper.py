"""The paper's, thesis's and brief's reference numbers, printed beside ours (``shared/PAPER.md``).

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
