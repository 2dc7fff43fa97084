"""Data layer: read, validate, RLE <-> mask, dataset object, multi-label stratified folds, one
module each (:mod:`.rle`, :mod:`.index`, :mod:`.formats`, :mod:`.loader`, :mod:`.folds`; the
error in :mod:`.errors`), every public name offered here.

Two on-disk formats are read into one :class:`DatasetIndex`:

* **Severstal** (Kaggle "Severstal: Steel Defect Detection"): ``train_images/*.jpg`` and
  ``train.csv``, either the current ``ImageId,ClassId,EncodedPixels`` (only non-empty masks listed;
  images in the folder but absent from the file are defect-free) or the original competition file
  ``ImageId_ClassId,EncodedPixels`` (four rows per image, empty = no mask). The synthetic set that
  ``cam2mask synth`` writes uses the current format.
* **Generic**, for anyone's data: ``images/<name>.<png|jpg|jpeg|bmp>``, ``labels.csv`` (column
  ``image`` then one 0/1 column per class, header = class names) and optionally
  ``masks/<class>/<name>.png`` (nonzero = defect).

Nothing downstream assumes four classes or Severstal's image size: the index carries the class
names and each image's own shape, and :class:`ImageDataset` resizes to the profile's input size.

Bad input raises :class:`DataError` naming the file, the line (CSV lines count from 1 = header)
and what was expected. Nothing is skipped silently.
"""
from .errors import DataError  # noqa: F401
from .rle import SEVERSTAL_SHAPE, parse_rle, rle_decode, rle_encode  # noqa: F401
from .index import (IMAGE_EXTENSIONS, SEVERSTAL_CLASSES, check_complete, DatasetIndex, image_size,
                    read_image, read_mask_png)  # noqa: F401
from .formats import (CURRENT_COLUMNS, INFO_FILE, ORIGINAL_COLUMNS, check_class_name, load_dataset,
                      load_generic, load_severstal)  # noqa: F401
from .loader import (IMAGENET_MEAN, IMAGENET_STD, JPEG_SUFFIXES, check_jpegs, decode_jpeg_batch,
                     image_array, ImageDataset, normalize_images, resize_image, resize_mask,
                     RowLoader)  # noqa: F401
from .folds import folds_for, make_folds  # noqa: F401
