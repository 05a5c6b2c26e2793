"""Code that runs in Spark's Python workers: training tasks, inference UDFs and what they share.

Deliberately empty: importing this package must not import Keras, because a task picks the
Keras backend and sizes its thread pools before the first import (see
``backend.prepare_backend``).
"""
