"""Models: torchvision backbones, the patch classifier and the image-level aggregators."""
