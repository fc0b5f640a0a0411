"""The operator: reconcile ModelDeployments into replica Pods, a Service, status and Events.

Pure modules (`observed`, `builders`, `plan`, `status`, `inputs`) compute data; `execute` is the
only module that writes to the API; `main` is the kopf glue that wires them together.
"""
