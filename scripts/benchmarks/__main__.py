"""`python -m scripts.benchmarks` (what `scripts/bench` runs, from the checkout)."""

from .cli import main

main()
