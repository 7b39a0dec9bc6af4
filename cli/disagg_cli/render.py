"""Rich rendering shared by the planning subcommands: the plan table and a progress bar on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from disagg_planner.api import Plan
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


@contextmanager
def search_progress(label: str, console: Console) -> Iterator[Callable[[int, int], None]]:
    """A callback for the search's progress(done, total), drawn on `console` while the block runs.

    On a non-terminal (CI logs, pipes) nothing is drawn: a bar there is only noise.
    """
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    task = progress.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    with progress:
        yield update


def _title(plan: Plan) -> str:
    if plan.mode == "colocated":
        how = (f"chunked prefill, {plan.chunk_token_budget} tokens per step" if plan.colocated_prefill == "chunked"
               else "prefill priority")
        return f"colocated plan, {how}"
    return f"{plan.mode} plan, {plan.affinity} node-affinity"


def plan_table(plan: Plan) -> Table:
    """Per phase: shape, replicas, GPUs, each instance's share of the plan's goodput, and its goodput alone.

    The share column adds up (replicas x share = the plan's goodput); the isolated column is what sized the
    replica counts, and need not add up: replicas simulated together share bursts (more) and KV transfer
    (less), and the plan's goodput is measured on the whole system.
    """
    table = Table(title=_title(plan), title_justify="left",
                  caption="share = plan goodput / replicas; isolated = one instance alone, judged on its phase's "
                          "SLO only (DistServe §4.1)",
                  caption_justify="left")
    for column in ("phase", "tp", "pp", "replicas", "GPUs", "share of goodput (req/s)", "isolated (req/s)"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name in ("prefill", "decode", "colocated"):
        phase = getattr(plan, name)
        if phase is not None:
            table.add_row(name, str(phase.tp), str(phase.pp), str(phase.replicas), str(phase.gpus),
                          f"{plan.goodput_rps / phase.replicas:.2f}", f"{phase.instance_goodput_rps:.2f}")
    return table


def alternatives_table(plan: Plan) -> Table | None:
    """One row per serving mode evaluated, the deployed one marked; None when the plan has no alternatives."""
    if not plan.alternatives:
        return None
    table = Table(title="serving modes evaluated", title_justify="left")
    for column in ("mode", "chunk", "GPUs", "req/s", "req/s/GPU", "meets target", ""):
        table.add_column(column, justify="left" if column in ("mode", "") else "right", no_wrap=column == "mode")
    for alt in plan.alternatives:
        chosen = alt.mode == plan.serving_mode
        table.add_row(alt.mode, str(alt.chunk_token_budget or "-"), str(alt.gpus) if alt.gpus else "-",
                      f"{alt.goodput_rps:.2f}", f"{alt.per_gpu_goodput:.3f}", "yes" if alt.meets_target else "no",
                      "deployed" if chosen else (alt.note[:60] or ""), style="bold" if chosen else None)
    return table


def placement_summary(plan: Plan) -> list[str]:
    """One line per node: which instance stage holds which GPUs (P = prefill, D = decode, C = colocated)."""
    letters = {"prefill": "P", "decode": "D", "colocated": "C"}
    by_node: dict[int, list[str]] = {}
    for p in sorted(plan.placement, key=lambda p: (p.node, p.gpus[0] if p.gpus else 0)):
        gpus = f"{p.gpus[0]}-{p.gpus[-1]}" if len(p.gpus) > 1 else str(p.gpus[0])
        stage = f"s{p.stage}" if _stages(plan, p.phase) > 1 else ""
        by_node.setdefault(p.node, []).append(f"{letters[p.phase]}{p.instance}{stage}[{gpus}]")
    return [f"node {node}: " + " ".join(items) for node, items in sorted(by_node.items())]


def _stages(plan: Plan, phase: str) -> int:
    shape = getattr(plan, phase)
    return shape.pp if shape is not None else 1


def summary_table(plan: Plan) -> Table:
    """Goodput, attainment and the colocated baseline, as label/value rows."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("GPUs", str(plan.gpus)),
        ("target rate", f"{plan.target_rate_rps:.2f} req/s"),
        ("goodput", f"{plan.goodput_rps:.2f} req/s"),
        ("goodput interval", interval_text(plan)),
        ("per-GPU goodput", f"{plan.per_gpu_goodput:.3f} req/s"),
        ("attainment at target", f"{plan.predicted_attainment:.1%}"),
    ]
    if plan.colocated_per_gpu_goodput is not None and plan.mode == "disaggregated":
        rows.append(("colocated baseline", f"{plan.colocated_per_gpu_goodput:.3f} req/s per GPU"))
        gain = f"{plan.gain_over_colocated:.2f}x" if plan.gain_over_colocated is not None else "n/a (baseline 0)"
        rows.append(("gain over colocated", gain))
    rows.append(("latency model", plan.latency_source))
    rows.append(("spec hash", plan.spec_hash))
    for label, value in rows:
        table.add_row(label, value)
    return table


def interval_text(plan: Plan) -> str:
    """`26.10-30.40 req/s (90%, 5 seeds)`, or `n/a` for a plan made without one."""
    iv = plan.goodput_interval
    if iv is None:
        return "n/a"
    return f"{iv.low_rps:.2f}-{iv.high_rps:.2f} req/s ({iv.coverage:.0%}, {iv.method} x{len(iv.seeds)})"


def print_plan(plan: Plan, console: Console) -> None:
    """The plan as a person reads it: phases, numbers, placement, and a warning when it misses the target."""
    console.print(plan_table(plan))
    alternatives = alternatives_table(plan)
    if alternatives is not None:
        console.print(alternatives)
        console.print(f"why: {plan.choice}")
    console.print(summary_table(plan))
    console.print("[bold]placement[/bold]")
    for line in placement_summary(plan):
        console.print(f"  {line}")
    if plan.goodput_rps < plan.target_rate_rps:
        console.print(
            f"[yellow]warning: the GPU budget buys {plan.goodput_rps:.2f} req/s of goodput, below the target "
            f"{plan.target_rate_rps:.2f} req/s; raise search.gpuBudget or relax the SLOs[/yellow]"
        )
