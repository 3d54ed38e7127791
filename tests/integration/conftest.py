"""The real-ComfyUI fixtures (``comfy_server``, ``run_workflow``, ...) live in tests/helpers/comfy_fixtures.py.

They are registered for the whole suite from tests/conftest.py, so the integration tests and the browser
tests (tests/browser/) share one ComfyUI per session instead of starting one each.
"""
