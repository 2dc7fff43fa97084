"""cam2mask: turn image-level classification labels into segmentation masks with Grad-CAM.

A reproducible companion to V. S. Sydorskyi, "The Method of Transformation of Image Classification
Labels into Segmentation Masks" (2022). Stages, one module each: ``data`` (read, validate, RLE,
folds), ``synth`` (synthetic Severstal-format data), ``eda`` (exploration figures and tables),
``profiles`` (scales of run), ``runner`` (execute the notebooks with papermill), ``report``
(figures and tables with their provenance).
"""
__version__ = "0.1.0"
