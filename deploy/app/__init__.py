"""The Serve app wired from a hierarchy config: the ingress server, the target replica that runs a one-level
hierarchy's rounds, the app builder, the cluster environment.

`deploy.app:build_app` is the `import_path` of the Serve config files in
`deploy/serve/` and of the KubeRay manifests. It is resolved on first access
rather than imported here: `deploy.app.cluster_env` must be importable without
importing `ray.serve`, which reads that environment when it is first imported.
"""


def __getattr__(name: str):
    if name == "build_app":
        from deploy.app.app import build_app

        return build_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
