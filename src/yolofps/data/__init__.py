"""Data formats, validation, the synthetic demo set and augmentation."""
