"""Which loss weights: per-expert weights and the CE weight (Optuna TPE + ASHA).

    python experiments/ablate_loss_weights.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/ablate_loss_weights.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/ablate_loss_weights.py -- train.lr=1e-3   # overrides of configs/ablate_loss_weights.yaml
    python experiments/ablate_loss_weights.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_loss_weights.py   # cluster: configs/ablate_loss_weights.cluster.yaml

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
