"""Datasets in torchvision's layout, public augmentation, and the synthetic sets parties release."""
