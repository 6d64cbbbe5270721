"""The worker process: build the pipeline from the settings, own partitions, run and drain."""
