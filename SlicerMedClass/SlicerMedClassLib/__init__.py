"""GUI-free code of the SlicerMedClass module.

``client`` (MONAI Label REST client), ``results`` and ``dependencies`` use the
standard library only and load in any Slicer; ``logic`` and ``volumes`` need
Slicer's MRML (``slicer``, ``vtk``) and numpy, and import medclass and torch
on first use. Nothing here imports Qt, so it runs headless (slicer-core).
"""
