import os
import sys

from forgetscale.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # a rank under torchrun (`measure --processes N`): everything is stored and closed by now; interpreter
    # teardown can still abort the process on torch.distributed's threads ("terminate called without an active
    # exception"), which turned a one-line error's exit code 2 into 1 on a loaded machine, so leave without it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
