"""dsf: DSF-WSI dual-branch self-supervised tumour segmentation of whole-slide images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dsf")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
