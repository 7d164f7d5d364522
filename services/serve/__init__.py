"""Serve building blocks that know no config: a level as a deployment, the router, the OpenAI protocol, metrics."""
