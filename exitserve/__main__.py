"""`python -m exitserve ...` is the `exitserve` command."""

import sys

from exitserve.cli import main

sys.exit(main())
