"""sweeper: sweep orchestration (Ray Tune), tracking (MLflow) and the command line."""
