"""The suite's figures as PNG files, drawn from results.json alone.

Every figure is written even when its rows could not be measured: a row
without numbers shows its reason in place of a bar or a line, so a
missing peer is visible rather than silently absent.

    /work/main/.venv/bin/python bench/plots.py bench/results/<run>/
"""

import json
import os
import sys
import textwrap

import matplotlib

# No display here: draw straight into files.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

FIGURE_FILES = ("cold_start.png", "warm_path.png", "scale.png")
DPI = 110
BAR = "#4878a8"
PEER = "#a0a0a0"
REASON = "#a05030"
# Round numbers of milliseconds for a log axis, labelled as plain numbers.
LOG_TICKS = [m * 10**e for e in range(-1, 5) for m in (1, 2, 5)]


def has_numbers(row):
    return isinstance(row, dict) and "reason" not in row


def short(text, width=70):
    return textwrap.shorten(str(text), width=width, placeholder="...")


def cold_start_chart(cold, path):
    """Horizontal bars: median per row, error bar up to the p95."""
    labels = [row["label"] for row in cold.values()]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(labels) + 1.6))
    positions = list(range(len(labels)))[::-1]
    measured = [row["median_ms"] for row in cold.values() if has_numbers(row)]
    # Log scale: docker and a SOCK sandbox differ by an order of
    # magnitude; the reason text starts at the smallest median.
    text_x = min(measured) / 2 if measured else 1.2
    for y, (key, row) in zip(positions, cold.items(), strict=True):
        if not has_numbers(row):
            ax.text(
                text_x,
                y,
                short(row["reason"]),
                va="center",
                fontsize=8,
                color=REASON,
            )
            continue
        colour = (
            PEER if key in ("crun", "runc", "docker", "http_floor") else BAR
        )
        median, p95 = row["median_ms"], row["p95_ms"]
        ax.barh(
            y,
            median,
            color=colour,
            xerr=[[0], [p95 - median]],
            capsize=4,
        )
        ax.text(
            p95 * 1.08,
            y,
            f"{median:.1f} ms (p95 {p95:.1f})",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(positions, labels, fontsize=9)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xscale("log")
    if measured:
        largest = max(
            row["p95_ms"] for row in cold.values() if has_numbers(row)
        )
        low, high = min(measured) / 3, largest * 6
    else:
        low, high = 1, 1000
    ax.set_xlim(low, high)
    ticks = [t for t in LOG_TICKS if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("cold start, ms (bar: median, whisker: p95; log scale)")
    ax.set_title("Cold start of a no-op: sockworker and peers, same run")
    ax.grid(axis="x", which="both", alpha=0.3)
    save(fig, path)


def warm_path_chart(warm, path):
    """Requests/s and p99 against connections, one line per server."""
    fig, (rate_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4))
    if not has_numbers(warm):
        for ax in (rate_ax, p99_ax):
            show_reason(ax, warm["reason"])
    else:
        connections = warm["connections"]
        for name, rows in warm["servers"].items():
            points = [c for c in connections if str(c) in rows]
            rate_ax.plot(
                points,
                [rows[str(c)]["rps"] for c in points],
                marker="o",
                label=name,
            )
            p99_ax.plot(
                points,
                [rows[str(c)]["p99_ms"] for c in points],
                marker="o",
                label=name,
            )
        for ax in (rate_ax, p99_ax):
            ax.set_xscale("log", base=2)
            ax.set_xticks(connections, [str(c) for c in connections])
            ax.set_xlabel("connections")
            ax.grid(alpha=0.3)
            ax.legend()
        rate_ax.set_ylabel("requests/s")
        rate_ax.set_ylim(bottom=0)
        p99_ax.set_ylabel("p99 latency, ms")
        p99_ax.set_ylim(bottom=0)
    rate_ax.set_title("Warm no-op: requests/s")
    p99_ax.set_title("Warm no-op: p99 latency")
    save(fig, path)


def scale_chart(scale, path):
    """Cold starts/s against clients; memory of the idle sandboxes."""
    fig, (rate_ax, pss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rate = scale["cold_start_rate"]
    if not has_numbers(rate):
        show_reason(rate_ax, rate["reason"])
    else:
        clients = [level["clients"] for level in rate["levels"].values()]
        rate_ax.plot(
            clients,
            [level["cold_starts_per_s"] for level in rate["levels"].values()],
            marker="o",
            color=BAR,
        )
        rate_ax.set_xscale("log", base=2)
        rate_ax.set_xticks(clients, [str(c) for c in clients])
        rate_ax.set_ylim(bottom=0)
        rate_ax.set_xlabel("concurrent clients")
        rate_ax.set_ylabel("cold starts/s")
        rate_ax.grid(alpha=0.3)
    rate_ax.set_title("Cold starts per second")

    density = scale["idle_density"]
    if not has_numbers(density):
        show_reason(pss_ax, density["reason"])
    else:
        memory_bars(pss_ax, density)
    pss_ax.set_title(idle_title(density))
    save(fig, path)


def memory_bars(ax, density):
    """Per idle sandbox: its memory limit, the median its cgroup is
    charged, the median PSS of its processes."""
    bars = [("limit", density["memory_mb"])]
    if density.get("median_charged_mib") is not None:
        bars.append(("charged (median)", density["median_charged_mib"]))
    bars.append(("PSS (median)", density["median_pss_mib"]))
    names = [name for name, _ in bars]
    values = [value for _, value in bars]
    ax.bar(names, values, color=[PEER] + [BAR] * (len(bars) - 1))
    for x, value in enumerate(values):
        ax.text(x, value, f"{value:g} MiB", ha="center", va="bottom")
    ax.set_ylabel("MiB per idle sandbox")
    ax.set_ylim(0, max(values) * 1.15)
    ax.grid(axis="y", alpha=0.3)


def idle_title(density):
    if not has_numbers(density):
        return "Idle sandboxes"
    return (
        f"{density['created']} idle sandboxes in "
        f"{density['budget_mb'] // 1024} GiB "
        f"({density['memory_mb']} MiB limit each)"
    )


def show_reason(ax, reason):
    ax.text(
        0.5,
        0.5,
        "\n".join(textwrap.wrap(f"not measured: {reason}", 40)),
        ha="center",
        va="center",
        color=REASON,
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def write_all(results, out_dir):
    """Draw every figure of results into out_dir; returns the paths."""
    paths = [os.path.join(out_dir, name) for name in FIGURE_FILES]
    cold_start_chart(results["cold_start"], paths[0])
    warm_path_chart(results["warm_path"], paths[1])
    scale_chart(results["scale"], paths[2])
    return paths


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: plots.py RESULTS_DIR", file=sys.stderr)
        return 2
    with open(os.path.join(args[0], "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    for path in write_all(results, args[0]):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
