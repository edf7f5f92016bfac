import sys

from cahp.cli import main

sys.exit(main())
