"""Which backbone: CoAT against the K = 0 fine-tune on the three backbones.

    python experiments/compare_backbones.py                  # one machine: local Ray, tiny backbone, coat-mini, MLflow in ./mlruns.db
    python experiments/compare_backbones.py --smoke          # a few minutes (the tests run it)
    python experiments/compare_backbones.py -- train.lr=1e-3 # dotted overrides of experiments/configs/compare_backbones.yaml
    python experiments/compare_backbones.py --resume         # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/compare_backbones.py   # a cluster: experiments/configs/compare_backbones.cluster.yaml
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main("compare_backbones")
