import sys

from enpire.cli import main

sys.exit(main())
