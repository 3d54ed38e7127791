"""Small host-independent helpers shared by nodes, pipelines, CLI and training scripts."""
