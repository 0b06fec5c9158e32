import sys

from petalnode.cli import main

sys.exit(main())
