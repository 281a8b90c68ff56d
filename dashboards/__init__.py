"""dashboards: the study's report, read from MLflow."""

import study  # noqa: F401  (first: it turns MLflow's telemetry off before MLflow is imported)
