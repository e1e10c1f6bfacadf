"""From MLflow runs to conclusions: tidy tables of sweeps (`runs`), comparisons over seeds and against a reference
setting (`compare`), linear probes (`probes`), and the notebooks in `analysis/` executed headless (`notebooks`)."""
