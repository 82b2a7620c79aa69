"""The classifier's training recipe (loop, augmentation, physics augmentation, curves): only ``ichfed bootstrap`` trains one."""
