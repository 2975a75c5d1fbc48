"""The paper's evaluation protocol as a script; the same as ``regmis benchmark`` (all flags alike).

    python benchmarks/evaluate_protocol.py --real-ct --out benchmarks/results/protocol_real_ct

The work lives in RegistrationMisalignmentLib/protocol.py; this file only makes it runnable from a
checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RegistrationMisalignmentLib.cli import main  # noqa: E402  (after the path setup)

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
