"""Audio experts: the features the thinking slots learn to regress (`registry.py` names them; `coat/roles.py` says
what each stands for). Kept empty so that importing a light part (the CLI) does not load torch."""
