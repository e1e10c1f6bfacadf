"""Which experts: each expert alone, leave-one-out, all.

    python experiments/ablate_expert_sets.py                  # one machine: local Ray, tiny backbone, coat-mini, MLflow in ./mlruns.db
    python experiments/ablate_expert_sets.py --smoke          # a few minutes (the tests run it)
    python experiments/ablate_expert_sets.py -- train.lr=1e-3 # dotted overrides of experiments/configs/ablate_expert_sets.yaml
    python experiments/ablate_expert_sets.py --resume         # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_expert_sets.py   # a cluster: experiments/configs/ablate_expert_sets.cluster.yaml
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main("ablate_expert_sets")
