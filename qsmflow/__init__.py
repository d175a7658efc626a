"""qsmflow: quantitative susceptibility mapping from multi-echo gradient-echo MRI."""

__version__ = "0.1.0"
#: the BIDS specification version every dataset_description.json qsmflow writes declares
BIDS_VERSION = "1.9.0"
