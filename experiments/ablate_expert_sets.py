"""Which experts: each expert alone, leave-one-out, all.

    python experiments/ablate_expert_sets.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/ablate_expert_sets.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/ablate_expert_sets.py -- train.lr=1e-3   # overrides of configs/ablate_expert_sets.yaml
    python experiments/ablate_expert_sets.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_expert_sets.py   # cluster: configs/ablate_expert_sets.cluster.yaml

Results: a table in the terminal, and an MLflow parent run with one child per trial (`make dashboard`).
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main(__file__)
