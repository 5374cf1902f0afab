"""What the processes share besides the broker: ``keys`` (every Redis key and TTL), ``registry`` (who
waits for which request), ``cache`` (computed answers and the data generation), ``fleet`` (each process's
snapshot for the status page) and ``sources`` (whether a dataset cache on disk is current). It imports
only the top-level modules: both the front and the workers build on it.
"""
