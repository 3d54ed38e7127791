"""Host-independent method code (plain torch). Nothing here imports ComfyUI."""
