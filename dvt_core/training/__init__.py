"""Training, framework-free: the configuration, the schedule, the data feed."""
