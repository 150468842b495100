"""pytest set-up for the Python checks of the deployment files (run by scripts/check-monitoring.sh
and scripts/check-helm.sh): the helper modules in scripts/ are importable from the tests."""

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
