import sys

from evosearch.cli import main

sys.exit(main())
