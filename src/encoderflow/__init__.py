"""encoderflow: pretrain a Transformer text encoder from scratch, promote it only when it earns it."""

__version__ = "0.1.0"
# The training DAG's id, for the DAG file, the CLI that runs it and the runs page that lists its runs.
DAG_ID = "encoder_pretraining"
