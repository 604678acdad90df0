"""The operator's side: a JSON API, Prometheus metrics and a dashboard, over HTTP.

Optional (``[http] enabled``) and served from the service's own event loop by aiohttp;
install it with ``.venv/bin/pip install -e '.[http]'`` in the checkout. docs/http.md
describes every route.
"""
