"""Training, evaluation, threshold choice, model card and export: the ``[train]`` extra.

Nothing the node runs imports this package: the worker, ``classify`` and the SCP need only
:mod:`model.inference`, :mod:`model.artifact` and :mod:`model.imaging`. Installing the node
without the extra (``pip install .``) leaves out TensorFlow, scikit-learn and matplotlib, which
the modules here import.
"""
