"""How much thinking: K in {0, 4, 16, 64}, and at K = 16 the controls that say what explains a gain (the same slots
unsupervised, and supervised with another clip's targets).

    python experiments/ablate_thinking_len.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/ablate_thinking_len.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/ablate_thinking_len.py -- train.lr=1e-3   # overrides of configs/ablate_thinking_len.yaml
    python experiments/ablate_thinking_len.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_thinking_len.py   # cluster: configs/ablate_thinking_len.cluster.yaml

Results: a table in the terminal, and an MLflow parent run with one child per trial (`make dashboard`).
"""

import os
import sys
from pathlib import Path

# `ray submit` runs this file alone from the head node's home folder: the runner is then the project's, found
# through $COAT_PROJECT (the cluster configs set it).
sys.path[:0] = [str(Path(__file__).resolve().parent), os.path.join(os.environ.get("COAT_PROJECT", "."), "experiments")]
try:
    from runner import main
except ModuleNotFoundError as err:
    if err.name != "runner":
        raise
    sys.exit(f"error: no experiment runner beside {__file__} nor in $COAT_PROJECT/experiments "
             f"(COAT_PROJECT={os.environ.get('COAT_PROJECT', 'unset')}): run the script from the project's "
             "experiments/ folder, or set COAT_PROJECT to the project folder (the cluster configs do)")

if __name__ == "__main__":
    main(__file__)
