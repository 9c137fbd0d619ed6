"""`python -m pretrain.universal`: thin entry point; the code lives in `pretrain.train.universal`."""

import sys

from pretrain.train.universal import main

if __name__ == "__main__":
    sys.exit(main())
