"""`python -m shardtune ...`: the same verbs as the `shardtune` script and `launch.py`."""

import sys

from shardtune.cluster.cli import main

sys.exit(main())
