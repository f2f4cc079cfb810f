"""Serving: the registered model's inference path (pre-process + model + NMS), with and without MLflow."""
