"""The operator's side: a JSON API, Prometheus metrics and a dashboard, over HTTP.

Optional (``[http] enabled``) and served from the service's own event loop by aiohttp;
install it with ``pip install 'bgservice[http]'``. docs/http.md describes every route.
"""
