"""asyncps worker package: training task, data pipeline and parameter-server client."""
