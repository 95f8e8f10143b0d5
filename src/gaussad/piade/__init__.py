"""PIADE (piade.md), the reconstruction detector: network, loss, training and the detector itself."""

from gaussad.piade.detector import PiadeAD

__all__ = ["PiadeAD"]
