"""``python -m spark_keras_ml score ...``: see :mod:`spark_keras_ml.cli`."""

from spark_keras_ml.cli import main

raise SystemExit(main())
