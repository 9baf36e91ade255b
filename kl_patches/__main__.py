import sys

from kl_patches.cli import main

sys.exit(main())
