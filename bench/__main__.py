"""`python -m bench [options]`: the served benchmark (bench.cli); `python -m bench instructions
[options]`: instructions per request under callgrind (bench.instructions)."""

import sys

if sys.argv[1:2] == ['instructions']:
    from bench.instructions import main as instructions

    raise SystemExit(instructions(sys.argv[2:]))

from bench.cli import main

raise SystemExit(main())
