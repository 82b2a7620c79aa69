"""Models: the nnU-Net segmenter (inference, checkpoints, the allow-list of what plans may name, postprocessing) and the ResNet-34 classifier, its head and BatchNorm statistics."""
