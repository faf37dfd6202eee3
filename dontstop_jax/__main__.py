import sys

from dontstop_jax.cli import main

sys.exit(main())
