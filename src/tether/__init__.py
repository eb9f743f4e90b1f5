"""tether: train language models from human preferences."""

__version__ = "0.1.0"
