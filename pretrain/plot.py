"""`python -m pretrain.plot`: thin entry point; the code lives in `pretrain.train.plot`."""

import sys

from pretrain.train.plot import main

if __name__ == "__main__":
    sys.exit(main())
