"""The modules that import Keras: model registry, pretrained weights, augmentation layers, Grad-CAM, export."""
