"""Where a continual model's latency comes from, as a graph to look at (networkx, written as Graphviz DOT).

Every node of the original graph is drawn with its delay and coloured by its
kind; every edge into a merge whose branch arrives early carries the delay
buffer that holds it back, labelled with the frames it holds. Following the
delays from the input to the output shows which layers add latency.
"""
from __future__ import annotations

import networkx as nx

COLOURS = {
    "time-free": "#ffffff",
    "pointwise": "#eeeeee",
    "sliding": "#9ecae1",
    "merge": "#fdae6b",
    "reduction": "#a1d99b",
    "windowed": "#fc9272",
    "recurrent": "#bcbddc",
    "output": "#ffffff",
}
BUFFER_COLOUR = "#cb181d"


def latency_graph(co) -> nx.DiGraph:
    """The original graph of `co` with node attributes kind/op/delay/receptive_field and edge attribute `buffered`.

    `buffered` is the number of the source's frames the merge's delay buffer
    holds in steady state: (merge delay - source delay) / source stride.
    """
    rows = {r.name: r for r in co.report}
    g = nx.DiGraph(receptive_field=co.receptive_field, delay=co.delay, exact=co.is_exact)
    for node in co.graph.nodes:
        row = rows.get(node.name)
        g.add_node(node.name, kind=row.kind if row else "output", op=row.op if row else "output",
                   delay=row.delay if row else co.delay, receptive_field=row.receptive_field if row else None,
                   exact=row.exact if row else co.is_exact)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name, buffered=_buffered(node, src, rows))
    return g


def _buffered(merge, src, rows) -> int:
    if rows.get(merge.name) is None or rows[merge.name].kind != "merge":
        return 0
    timing = src.meta.get("cofx_timing")
    if timing is None or rows[src.name].delay is None:
        return 0   # a time-free input: nothing to align
    return (rows[merge.name].delay - rows[src.name].delay) // timing.stride


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text of `latency_graph(co)`: nodes coloured by kind, labelled with their delay."""
    title = (f"receptive field {g.graph['receptive_field']} frames, delay {g.graph['delay']} frames, "
             f"{'exact' if g.graph['exact'] else 'not exact'}; red edges: delay buffers (frames held)")
    lines = ["digraph cofx {",
             f"  label={_quote(title)}; labelloc=t; fontname=Helvetica;",
             '  node [shape=box, style="rounded,filled", fontname=Helvetica];',
             "  edge [fontname=Helvetica];"]
    for name, a in g.nodes(data=True):
        if a["op"].replace(".", "_") == name:   # a module call: its path says it all
            title = a["op"]
        else:
            title = name if a["op"] == name else f"{name}: {a['op']}"
        label = f"{title}\n{a['kind']}\ndelay {a['delay']}"
        if a["kind"] == "windowed":
            label += "\nNOT EXACT"
        colour = COLOURS.get(a["kind"], "#ffffff")
        lines.append(f"  {_quote(name)} [label={_quote(label)}, fillcolor={_quote(colour)}];")
    for src, dst, a in g.edges(data=True):
        n = a["buffered"]
        style = (f' [label={_quote(f"buffer {n} frame" + ("s" if n != 1 else ""))}, color="{BUFFER_COLOUR}", '
                 f'fontcolor="{BUFFER_COLOUR}", penwidth=2]') if n else ""
        lines.append(f"  {_quote(src)} -> {_quote(dst)}{style};")
    lines.append("  subgraph cluster_legend {")
    lines.append('    label="kinds"; style=dashed;')
    for kind, colour in COLOURS.items():
        if kind != "output":
            lines.append(f'    {_quote("legend " + kind)} [label={_quote(kind)}, fillcolor={_quote(colour)}];')
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_dot(co, path) -> nx.DiGraph:
    """Write the latency graph of `co` to `path` (render with: dot -Tpng path -o graph.png); returns the graph."""
    g = latency_graph(co)
    with open(path, "w") as f:
        f.write(to_dot(g))
    return g


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
