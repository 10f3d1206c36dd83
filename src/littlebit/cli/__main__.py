import sys

from littlebit.cli.main import main

sys.exit(main())
