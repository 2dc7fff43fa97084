"""cam2mask: turn image-level classification labels into segmentation masks with Grad-CAM.

A reproducible companion to V. S. Sydorskyi, "The Method of Transformation of Image Classification
Labels into Segmentation Masks" (2022). One module per stage:

* ``data`` read and validate datasets (Severstal or generic format), RLE, folds;
  ``synth`` the synthetic Severstal-format set; ``eda`` exploration figures and tables;
* ``classify`` the paper's classifier, its cross-validated training and finished runs;
* ``cams`` Grad-CAM / Grad-CAM++ / LayerCAM of every class at once, cached per dataset;
* ``postprocess`` CAMs -> masks (confidence, threshold, minimum area), their search, export;
  ``metrics`` Kaggle Dice;
* ``segment`` segmentation networks and their training; ``losses`` the thesis's and lecture's
  losses by name; ``seg_stage`` the segmentation stage on a context (targets, one network per
  held-out fold, scoring);
* ``trainer`` the resumable training loop the classifier and segmentation networks share;
  ``device`` the device policy;
* ``pipeline`` the context every notebook starts from and the stage calls; ``experiments`` the
  paper's Tables 2-4; ``profiles`` scales of run composed of the stages' configurations;
* ``masks`` ``cam2mask masks`` for anyone's data; ``runner`` executes the notebooks with
  papermill; ``report`` tables and figures with their provenance; ``viz`` the pictures;
  ``paper`` the paper's and thesis's reference numbers; ``cli`` the ``cam2mask`` command.
"""
import warnings

__version__ = "0.1.0"

# timm imports huggingface_hub, which imports tqdm.auto; in a Jupyter kernel without ipywidgets
# that warns, naming the machine's site-packages path, in every executed notebook
warnings.filterwarnings("ignore", message="IProgress not found")
