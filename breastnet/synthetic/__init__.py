"""Generated H&E-like images in BACH layout (demo and tests): ``tissue`` draws each class,
``render`` stains it, ``dataset`` writes class folders (``python -m breastnet.synthetic DIR``)."""

from breastnet.synthetic.dataset import write_synthetic_dataset

__all__ = ["write_synthetic_dataset"]
