import sys
from pathlib import Path

# The scenarios share the cluster helpers of the smoke tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import namespace  # noqa: E402,F401  (the same fixture)
