"""Core library of the C-NMC leukemia workbench: data, preprocessing, models, metrics, explanations.

Importing a submodule never runs work; heavy dependencies (TensorFlow/Keras) are imported only by the
modules that build or run models.
"""
