"""`python -m clipft ...` (also what `torchrun -m clipft` runs)."""
import sys

from .cli.commands import main

sys.exit(main())
