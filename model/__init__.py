"""The fracture classifier.

Runtime (what the node installs): :mod:`model.artifact` (the artifact on disk),
:mod:`model.inference` (the exported network, no TensorFlow) and :mod:`model.imaging` (DICOM
and pictures to pixels). Development (the ``[train]`` extra): :mod:`model.training`.
"""
