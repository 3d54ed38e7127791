"""python -m facebooth ... (see cli/main.py)."""
from facebooth.cli.main import main

raise SystemExit(main())
