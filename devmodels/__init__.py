"""Random-weight models in the official layouts, for tests and for the main job's embedded default."""
