import sys

from ensemblekit.cli.main import main

sys.exit(main())
