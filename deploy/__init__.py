"""Deployment files (compose, Prometheus, Grafana) and the code that generates the dashboards."""
