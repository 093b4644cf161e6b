"""HTTP inference over an exported shardtune model: a FastAPI app in a Ray Serve deployment with
dynamic batching, bounded queues and Prometheus metrics (`shardtune serve`)."""
