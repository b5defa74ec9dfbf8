import sys

from nvmefs.cli import main

sys.exit(main())
