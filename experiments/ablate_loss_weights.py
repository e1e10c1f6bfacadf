"""Which loss weights: per-expert weights and the CE weight (Optuna TPE + ASHA).

    python experiments/ablate_loss_weights.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/ablate_loss_weights.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/ablate_loss_weights.py -- train.lr=1e-3   # overrides of configs/ablate_loss_weights.yaml
    python experiments/ablate_loss_weights.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_loss_weights.py   # cluster: configs/ablate_loss_weights.cluster.yaml

Results: a table in the terminal, and an MLflow parent run with one child per trial (`make dashboard`).
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main(__file__)
