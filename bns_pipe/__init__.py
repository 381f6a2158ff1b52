"""bns_pipe: distributed full-graph GCN training with boundary-node sampling and pipelining."""

__version__ = "0.1.0"
