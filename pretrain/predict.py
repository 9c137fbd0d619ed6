"""`python -m pretrain.predict`: thin entry point; the code lives in `pretrain.downstream.predict`."""

import sys

from pretrain.downstream.predict import main

if __name__ == "__main__":
    sys.exit(main())
