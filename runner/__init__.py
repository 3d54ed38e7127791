"""Drive a real ComfyUI over HTTP: start a server, submit API workflows, collect images."""
