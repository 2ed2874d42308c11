"""SlicerMedClass shared core: models, data, training, evaluation and explanation.

The DICOM node, the MONAI Label app and the 3D Slicer module all import this
package; nothing model-related is written twice.
"""

__version__ = "0.1.0"

from medclass.errors import MedClassError  # noqa: E402

__all__ = ["MedClassError", "__version__"]
