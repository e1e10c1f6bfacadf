"""Which backbone: CoAT against the K = 0 fine-tune on the three backbones.

    python experiments/compare_backbones.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/compare_backbones.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/compare_backbones.py -- train.lr=1e-3   # overrides of configs/compare_backbones.yaml
    python experiments/compare_backbones.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/compare_backbones.py   # cluster: configs/compare_backbones.cluster.yaml

Results: a table in the terminal, and an MLflow parent run with one child per trial (`make dashboard`).
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main(__file__)
