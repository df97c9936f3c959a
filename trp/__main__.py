import sys

from trp.cli import main

sys.exit(main())
