"""`python -m exitserve.experiments {run,report}`: see experiments/runner.py."""

from exitserve.experiments.runner import main

main()
