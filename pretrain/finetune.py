"""`python -m pretrain.finetune`: thin entry point; the code lives in `pretrain.downstream.finetune`."""

import sys

from pretrain.downstream.finetune import main

if __name__ == "__main__":
    sys.exit(main())
