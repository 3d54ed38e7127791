"""Command-line interface: python -m facebooth ..."""
