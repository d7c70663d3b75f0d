"""permitgate: the offline access agent for residence-permit door access."""

__version__ = "0.1.0"
