"""How much thinking: K in {0, 4, 8, 16, 32, 64}.

    python experiments/ablate_thinking_len.py                 # one machine: local Ray, tiny backbone, coat-mini
    python experiments/ablate_thinking_len.py --smoke         # minutes, small coat-mini (the tests)
    python experiments/ablate_thinking_len.py -- train.lr=1e-3   # overrides of configs/ablate_thinking_len.yaml
    python experiments/ablate_thinking_len.py --resume        # continue an interrupted sweep
    ray submit cluster/gpu.yaml experiments/ablate_thinking_len.py   # cluster: configs/ablate_thinking_len.cluster.yaml

Results: a table in the terminal, and an MLflow parent run with one child per trial (`make dashboard`).
"""

from coat.tune.experiment import main

if __name__ == "__main__":
    main(__file__)
