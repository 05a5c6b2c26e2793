"""Code that runs in Spark's Python workers: training tasks, inference UDFs and what they share.

Deliberately empty: importing this package must not import Keras, because a task sizes
TensorFlow's thread pools before the first import (see ``resources.configure_threads``).
"""
