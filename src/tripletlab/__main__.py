"""``python -m tripletlab``."""

import os
import sys

from .cli import main

code = main()
if "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1":
    # A torchrun worker: every file is written (atomically) and the process group is destroyed
    # by now. Skip the interpreter's finalisation, where objects still holding gloo's process
    # group (the DDP wrapper, autograd-collective state) can be torn down from C++ worker threads
    # and abort the process (seen as "terminate called without an active exception", SIGABRT,
    # after a run that had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
