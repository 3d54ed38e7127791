"""Headless batch generation over ComfyUI's HTTP API (``python -m facebooth batch``).

One module per job:

* ``jobs``       the job spec: a workflow plus jobs (CSV/JSONL table or faces x prompts x seeds) that fill it
* ``checks``     dry-run checks of every job against a server's ``/object_info``, all problems at once
* ``journal``    ``journal.sqlite`` in the output folder: every job's status, so a re-run resumes
* ``servers``    one ComfyUI seen through a transport (aiohttp here, a Ray actor in ``ray_mode``)
* ``outputs``    deterministic, atomic output files with the workflow and job values in PNG metadata
* ``dispatcher`` pull-based balancing over servers, resume, retries, clean stop
* ``progress``   the progress line (done/failed, images/min per server, ETA)
* ``report``     ``report.html`` (identity x prompt grid) and the CSV/JSONL manifest
* ``scoring``    ``--score``: ID similarity of each image to its job's face with the pack's face analysis
* ``ray_mode``   ``--ray``: one actor per GPU, each with its own ComfyUI (Ray imported lazily)
"""
