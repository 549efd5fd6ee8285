"""`python -m vecshim.engine`: run one engine process (the gunicorn master starts it)."""
import sys

from .process import main

sys.exit(main())
