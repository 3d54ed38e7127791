"""Face analysis: detection, 5-point alignment, crops, masks, ArcFace identity, similarity."""
