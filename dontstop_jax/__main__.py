import sys

from dontstop_jax.cli import main

if __name__ == "__main__":  # prepare's encoding workers are spawned and re-import the main module
    sys.exit(main())
