import sys

from molink.loadgen.cli import main

sys.exit(main())
