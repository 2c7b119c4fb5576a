"""Load generator and benchmarks.

`python -m loramux.loadtest` (or `loramux loadtest`) runs the command line in
`loadtest/__main__.py`; the pieces are `generator` (workload, arrivals, HTTP client, samples),
`report` (metrics, JSON, plots), `adapters` (random PEFT adapters, admin-API loading) and
`peft_baseline` (the same workload in process on peft.PeftModel).
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The load tester's command line (`loramux loadtest ...` calls this)."""
    # Imported here, not at package import, so `python -m loramux.loadtest` runs __main__
    # without runpy's "found in sys.modules" warning.
    from loramux.loadtest.__main__ import main as cli

    return cli(argv, prog)
