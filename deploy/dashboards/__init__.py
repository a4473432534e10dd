"""Grafana dashboards as code: ``python -m deploy.dashboards.generate`` writes ``deploy/grafana/dashboards``."""
