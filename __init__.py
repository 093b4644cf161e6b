"""shardtune: fine-tune transformer encoders for NER and text classification on a Ray cluster.

The repository root is the `shardtune` package: `data/`, `training/`, `cluster/` and `serving/`
install as `shardtune.data`, `shardtune.training`, ... (pyproject.toml maps them); imports flow
data <- training <- cluster. `shardtune` (the console script), `python -m shardtune` and
`python launch.py` in a checkout run the same CLI, `shardtune.cluster.cli`.
"""

__version__ = "0.2.0"
