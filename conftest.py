"""Root conftest: keeps generated reports out of collection.

pytest-llem itself is loaded through its ``pytest11`` entry point once the package is installed,
so ``pytest suites/`` needs nothing here.
"""

from __future__ import annotations

collect_ignore = ["reports", "build", "dist"]
