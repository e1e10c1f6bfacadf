"""Which loss weights: per-expert weights and the CE weight (Optuna TPE + ASHA).

    python experiments/ablate_loss_weights.py                  # one machine: local Ray, tiny backbone, coat-mini, MLflow in ./mlruns.db
    python experiments/ablate_loss_weights.py --smoke          # a few minutes (the tests run it)
    python experiments/ablate_loss_weights.py -- train.lr=1e-3 # dotted overrides of experiments/configs/ablate_loss_weights.yaml
    python experiments/ablate_loss_weights.py --resume         # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_loss_weights.py   # a cluster: experiments/configs/ablate_loss_weights.cluster.yaml
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main("ablate_loss_weights")
