"""Measures every model on the paper's protocol (elastix settings x landmarks); the same as ``regmis benchmark``.

    python benchmarks/evaluate_protocol.py --chest-ct --out benchmarks/results/protocol_chest_ct --device cpu --threads 2 --tile-size 192

The work lives in RegistrationMisalignmentLib/benchmark/study.py; this file only makes it runnable from a
checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RegistrationMisalignmentLib.cli import main  # noqa: E402  (after the path setup)

if __name__ == "__main__":
    sys.exit(main(["benchmark", *sys.argv[1:]]))
