"""gaussad: unsupervised visual anomaly detection from Gaussian models of deep features."""

__version__ = "0.1.0"
