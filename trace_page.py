"""generate.py --trace: one self-contained HTML page of what the hybrid cache did on a prompt.

Per layer its strategy, and for offloaded layers the prompt with each token shaded by how often the
layer retrieved it over the decode steps (summed over KV heads), the sinks and the final recent
window marked; the cache's device and host bytes and its host->device bytes per step. No server, no
network: the data and the script are inline.
"""
import html
import json

import torch

class TraceRecorder:
    """What the offloaded layers retrieved at each decode step, for generate.py --trace.

    positions (steps, n_layers, n_kv, topk): the offloaded positions each layer fetched per KV head at
    decode step i (position first + i), -1 where nothing was. It is preallocated on the device and
    written inside the step (index_copy_ at the step's own position: no host sync, so a CUDA graph
    records too); read it back once, at the end. A cache without a recorder records nothing.
    """

    def __init__(self, n_layers: int, n_kv: int, topk: int, first: int, steps: int, device):
        self.first = first
        self.positions = torch.full((steps, n_layers, n_kv, topk), -1, dtype=torch.int32, device=device)

    @classmethod
    def of(cls, cache, first: int, steps: int) -> "TraceRecorder":
        """A recorder of what every offloaded layer of `cache` retrieves from decode position `first` on."""
        trace = cls(len(cache.layers), cache.shape[0], max(cache.cfg.max_topk, 1), first, steps, cache.device)
        cache.record(trace)
        return trace

    def record(self, layer: int, idx: torch.Tensor, pos):
        """idx (n_kv, <= topk) positions fetched by `layer` at decode position pos (an int or a device tensor)."""
        row = torch.full_like(self.positions[0, layer], -1)
        row[:, :idx.shape[1]] = idx
        step = (pos - self.first) if torch.is_tensor(pos) else torch.tensor(pos - self.first, device=row.device)
        self.positions[:, layer].index_copy_(0, step.view(1).clamp(0, self.positions.shape[0] - 1), row[None])


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; color: #222; }
h1 { font-size: 1.3em; } .meta { color: #555; } table { border-collapse: collapse; margin: .6em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; } th { background: #f3f3f3; }
#layers button { margin: 2px; padding: 2px 7px; border: 1px solid #aaa; background: #fff; cursor: pointer; }
#layers button.quant { background: #fde3c8; } #layers button.window { background: #eee; }
#layers button.on { outline: 2px solid #1a56db; font-weight: bold; }
#text { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12.5px; border: 1px solid #ddd;
        padding: .8em; margin-top: .6em; } #text span.sink { outline: 2px solid #c00; }
#text span.recent { text-decoration: underline 2px #1a8f3c; } .legend span { padding: 0 .5em; }
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('data').textContent);
const text = document.getElementById('text'), info = document.getElementById('info');
const spans = data.tokens.map((t, i) => { const s = document.createElement('span'); s.textContent = t;
  if (i < data.sink) s.className = 'sink'; else if (i >= data.recent_from) s.className = 'recent';
  text.appendChild(s); return s; });
function show(l) {
  document.querySelectorAll('#layers button').forEach((b, i) => b.classList.toggle('on', i === l));
  const layer = data.layers[l], counts = layer.counts, most = counts ? Math.max(1, ...counts) : 1;
  spans.forEach((s, i) => { const c = counts ? counts[i] : 0;
    s.style.background = c ? `rgba(26, 86, 219, ${0.12 + 0.88 * c / most})` : '';
    s.style.color = c && c / most > 0.55 ? '#fff' : ''; s.title = counts ? `position ${i}: retrieved ${c}x` : ''; });
  info.textContent = counts ? `layer ${l}: offloaded; ${layer.retrieved} distinct prompt tokens retrieved over ` +
    `${data.steps} steps (darkest: ${most}x, of ${data.steps * data.n_kv} possible)` :
    `layer ${l}: ${layer.describe} (nothing retrieved: no shading)`;
}
data.layers.forEach((layer, l) => { const b = document.createElement('button'); b.textContent = l;
  b.className = layer.kind; b.title = layer.describe; b.onclick = () => show(l);
  document.getElementById('layers').appendChild(b); });
show(Math.max(0, data.layers.findIndex(x => x.counts)));
"""


def page_data(tokens: list[str], kinds: list[str], cfg, positions: torch.Tensor, steps: int, memory: dict,
              title: str) -> dict:
    """The page's data. positions (steps, n_layers, n_kv, topk) from a TraceRecorder, -1 = none."""
    n = len(tokens)
    pos = positions[:steps].long().cpu()
    layers = []
    for i, kind in enumerate(kinds):
        describe = {"quant": f"quantized to {cfg.bits} bits", "full": "full cache",
                    "window": f"sinks {cfg.sink} + recent {cfg.recent} only",
                    "sparse": f"offloaded: sinks {cfg.sink} + recent {cfg.recent} + top-{cfg.topk_of(i)} by {cfg.select}"}[kind]
        row = {"kind": kind, "describe": describe, "counts": None}
        if kind == "sparse":
            p = pos[:, i].flatten()
            p = p[(p >= 0) & (p < n)]
            counts = torch.bincount(p, minlength=n)[:n]
            row.update(counts=counts.tolist(), retrieved=int((counts > 0).sum()))
        layers.append(row)
    return {"title": title, "tokens": tokens, "layers": layers, "sink": cfg.sink, "steps": steps,
            "n_kv": int(positions.shape[2]), "recent_from": max(cfg.sink, n + steps - cfg.recent), "memory": memory}


def render(data: dict) -> str:
    mem = data["memory"]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    rows = "".join(f"<tr><td style='text-align:left'>{html.escape(kind)}</td><td>{r['layers']}</td>"
                   f"<td>{mib(r['device_bytes'])}</td><td>{mib(r['host_bytes'])}</td>"
                   f"<td>{r['h2d_bytes_per_step'] / 1024:.1f}</td></tr>" for kind, r in mem["by_kind"].items())
    blob = json.dumps(data).replace("</", "<\\/")  # nothing in the data can close the script element
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(data['title'])}</title><style>{STYLE}</style></head>
<body><h1>{html.escape(data['title'])}</h1>
<p class="meta">{len(data['tokens'])} prompt tokens, {data['steps']} decode steps.</p>
<table><tr><th>layers</th><th>count</th><th>device MiB</th><th>host MiB</th><th>H2D KiB/step</th></tr>{rows}
<tr><th style='text-align:left'>total</th><th></th><th>{mib(mem['device_bytes'])}</th><th>{mib(mem['host_bytes'])}</th>
<th>{mem['h2d_bytes_per_step'] / 1024:.1f}</th></tr></table>
<p>Layer (orange: quantized, white: offloaded, grey: window only):</p><div id="layers"></div>
<p id="info" class="meta"></p>
<p class="legend meta"><span style="outline:2px solid #c00">sink</span>
<span style="text-decoration:underline 2px #1a8f3c">recent window at the end</span>
<span style="background:rgba(26,86,219,.6);color:#fff">retrieved often</span></p>
<div id="text"></div>
<script type="application/json" id="data">{blob}</script>
<script>{SCRIPT}</script></body></html>
"""
