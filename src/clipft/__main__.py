"""`python -m clipft ...` (also what `torchrun -m clipft` runs)."""
import sys

from .cli import main

sys.exit(main())
