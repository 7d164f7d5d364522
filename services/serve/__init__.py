"""Serve building blocks that know no config: a level as a deployment, the router, a target replica's rounds as the
ingress reads them, the OpenAI protocol, metrics."""
