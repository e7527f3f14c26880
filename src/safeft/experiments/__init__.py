"""Experiments: grids of runs (``sweep``) and the tables, plots and report made from them (``report``)."""
