"""How much thinking: K in {0, 4, 8, 16, 32, 64}.

    python experiments/ablate_thinking_len.py                  # one machine: local Ray, tiny backbone, coat-mini, MLflow in ./mlruns.db
    python experiments/ablate_thinking_len.py --smoke          # a few minutes (the tests run it)
    python experiments/ablate_thinking_len.py -- train.lr=1e-3 # dotted overrides of experiments/configs/ablate_thinking_len.yaml
    python experiments/ablate_thinking_len.py --resume         # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_thinking_len.py   # a cluster: experiments/configs/ablate_thinking_len.cluster.yaml
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main("ablate_thinking_len")
