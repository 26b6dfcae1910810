"""CSRef in plain PyTorch: models, preprocessing, checkpoint I/O and the `Grounder` inference API."""

from csref_model.grounder import Grounder, GroundingResult, ImageFeatures, SpeechFeatures

__all__ = ["Grounder", "GroundingResult", "ImageFeatures", "SpeechFeatures"]
