import sys
from pathlib import Path

# The scenarios share the cluster helpers (kube.py) of the smoke tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
