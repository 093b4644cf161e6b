"""HTTP inference over an exported shardtune model: a FastAPI app in a Ray Serve deployment with
dynamic batching, bounded queues and Prometheus metrics (`shardtune serve`)."""

INGRESS_MODES = ("auto", "direct", "proxy")
"""How HTTP reaches the model (`serve --ingress`; serving/server.py)."""
