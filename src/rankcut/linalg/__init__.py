"""Tensor math for low-rank factorization. Nothing here knows about ``nn.Module``."""

from rankcut.linalg.evbmf import EVBMFResult, evbmf
from rankcut.linalg.spectrum import RandomizedSVDError, Spectrum
from rankcut.linalg.tucker import Tucker2Factors, TuckerBasis

__all__ = ["EVBMFResult", "RandomizedSVDError", "Spectrum", "Tucker2Factors", "TuckerBasis", "evbmf"]
