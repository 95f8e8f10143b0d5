"""The Gaussian detector (gaussian-deep-features.md): settings, pixel inputs, map operations, the
statistics and the detector itself.

    settings        the settings table and the presets
    statistics      streaming moments -> NPCA / PCA / none -> Ledoit-Wolf or ridge -> Mahalanobis
    map_operations  local averages, stacking levels, upsampling and smoothing maps
    pixel_inputs    what each pixel Gaussian is fitted on
    detector        GaussianAD: fit / score / save / load
"""

from gaussad.gaussian.detector import GaussianAD

__all__ = ["GaussianAD"]
