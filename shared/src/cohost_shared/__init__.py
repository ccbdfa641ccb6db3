"""What every part of cohost shares: the message contract, endpoints, metrics, logs and
settings errors."""
