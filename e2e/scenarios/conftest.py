import os
import sys
from pathlib import Path

import pytest

# The scenarios share the cluster helpers (kube.py) of the smoke tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deploy import conclave_installed, install_conclave, uninstall_conclave  # noqa: E402


@pytest.fixture(scope="session")
def conclave_release():
    """One Helm release of Conclave for every scenario module: installing the
    chart and waiting for its operator costs a minute, so the modules share it
    and each works in namespaces of its own. CONCLAVE_E2E_KEEP=1 leaves it
    installed afterwards (for looking around, or a quicker next run)."""
    install_conclave(upgrade=conclave_installed())
    yield
    if not os.environ.get("CONCLAVE_E2E_KEEP"):
        uninstall_conclave()
