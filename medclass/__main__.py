import sys

from medclass.cli import main

sys.exit(main())
