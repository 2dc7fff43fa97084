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
