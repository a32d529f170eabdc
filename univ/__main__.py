import sys

from univ.cli import main

sys.exit(main())
