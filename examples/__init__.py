"""Runnable LCL jobs: pre-training (`pretrain_lcl`, the `lcl-pretrain` console script) and downstream scripts."""
