import os
import sys

from .cli import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # Under torchrun a process whose work is done (its files written and closed, its process group
    # destroyed) can still abort while the interpreter finalises: SIGABRT, "terminate called without an
    # active exception", from PyTorch's gloo threads outliving the teardown (rare; seen once in a 2-process
    # FSDP test run). torchrun would report the whole job as failed. Nothing is left to finalise, so each
    # process ends here with its own status.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
sys.exit(status)
