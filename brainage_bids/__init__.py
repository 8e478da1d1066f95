"""brainage-bids: brain age from T1w and T2-FLAIR MRI as a BIDS App."""

__version__ = "0.1.0"
