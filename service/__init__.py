"""promptserve service: many few-shot prompt classifiers on one frozen open_clip backbone."""

__version__ = "0.1.0"
