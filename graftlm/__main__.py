"""`python -m graftlm ...` (what torchrun launches) runs the same CLI as `graftlm ...`."""

import sys

from graftlm.cli.parser import main

sys.exit(main())
