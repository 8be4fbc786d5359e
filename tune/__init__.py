"""Search service: spaces, the trial function, Tuner build/run/resume, results.

Ray and Optuna are imported by the submodules that need them (tune.search, tune.results), so
`bitsearch quantize` (which uses the pipeline package) starts without them. tune reaches MLflow
only through mlflow_server.
"""
