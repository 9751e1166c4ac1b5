"""Runnable examples: a user's own model, data, loss and metric (see each script).

The directory is a package so their functions can be named by import strings from the
repository root, e.g. ``--model examples.regression:make_model``."""
