"""encoderflow: pretrain a Transformer text encoder from scratch, promote it only when it earns it."""

__version__ = "0.1.0"
