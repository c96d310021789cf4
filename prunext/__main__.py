import sys

from prunext.cli import main

sys.exit(main())
