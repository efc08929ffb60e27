import sys

from qtool.cli import main

sys.exit(main())
