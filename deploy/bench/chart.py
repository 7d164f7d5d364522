"""The benchmark's chart: tokens per second by method, overall and per category, as a PNG."""

from __future__ import annotations

from pathlib import Path


def draw_chart(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    groups = ["overall", *sorted({g for m in result["methods"].values() for g in m["per_category"]})]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) + 0.25 * len(methods) * len(groups)), 4.5))
    for i, name in enumerate(methods):
        m = result["methods"][name]
        values = [m["tokens_per_s"] if g == "overall" else m["per_category"].get(g, {}).get("tokens_per_s", 0.0)
                  for g in groups]
        positions = [x + (i - (len(methods) - 1) / 2) * width for x in range(len(groups))]
        bars = ax.bar(positions, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("tokens / s (greedy)")
    ax.set_title(f"{result['config']}, {result['dtype']}, {result['questions']} questions, "
                 f"max {result['max_tokens']} tokens", fontsize=9)
    ax.legend(fontsize=7, ncols=min(len(methods), 4))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_load_chart(result: dict, path: str | Path) -> Path:
    """`hierspec bench-serve`'s sweep: total tokens/s and p50 inter-token latency against concurrent clients."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result["sweep"]
    clients = [point["clients"] for point in sweep]
    fig, speed = plt.subplots(figsize=(6.0, 4.0))
    speed.plot(clients, [point["tokens_per_s"] for point in sweep], "o-", color="tab:blue")
    speed.set_xscale("log", base=2)
    speed.set_xticks(clients, [str(c) for c in clients])
    speed.set_xlabel("concurrent streaming clients")
    speed.set_ylabel("tokens / s, all clients", color="tab:blue")
    latency = speed.twinx()
    latency.plot(clients, [point["itl_ms"]["p50"] for point in sweep], "s--", color="tab:red")
    latency.set_ylabel("inter-token latency p50, ms", color="tab:red")
    speed.set_title(f"{result['config']} ({result['method']}, {result['dtype']}), {result['max_tokens']} tokens "
                    "per request", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
