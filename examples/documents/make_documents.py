"""Writes the generated accuracy documents: a table-like ledger, a Python module, and a ledger long enough
for a 32k-token context.

Both are deterministic (fixed seeds), so rerunning this script reproduces the shipped files:

    python examples/documents/make_documents.py

The values are random, so the only way to reproduce a row or a constant is to look back at it —
which is what the document-repeat task measures.
"""
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIONS = ["Ostmark", "Keld Point", "Harrow Sound", "Brenn Quay", "Aldane Rock", "Varga Light", "Tollmouth",
            "North Skerry", "Lask Bay", "Denk Reef", "Roos Pier", "Greywater"]
SKY = ["clear", "fair", "haze", "overcast", "drizzle", "rain", "squalls", "fog", "sleet", "broken cloud"]
WIND = ["N", "NNE", "NE", "E", "SE", "S", "SW", "W", "NW", "NNW"]
WORDS = ["tide", "gauge", "buoy", "swell", "datum", "offset", "reading", "station", "sensor", "drift", "mooring",
         "channel", "beacon", "sample", "window", "record", "ledger", "survey", "chart", "sounding", "current",
         "bearing", "height", "period", "pressure", "salinity", "bias", "gain", "limit", "margin"]


def table(rng: random.Random, rows: int = 150) -> str:
    lines = ["Harbour observation ledger, spring quarter. Heights in metres above chart datum, water and air "
             "temperature in degrees Celsius, wind as direction and Beaufort force, pressure in hectopascals.", "",
             "| day | time | station | height | water | air | wind | pressure | sky | observer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    observers = ["I.V.", "M.V.", "O.L.", "H.R.", "T.B.", "A.D.", "E.K.", "S.N."]
    for i in range(rows):
        day = f"{3 + i // 10:02d}-{1 + (i * 7) % 28:02d}"
        lines.append(f"| {day} | {rng.randrange(24):02d}:{rng.choice([0, 15, 30, 45]):02d} | {rng.choice(STATIONS)} "
                     f"| {rng.uniform(0.2, 5.8):.2f} | {rng.uniform(4, 14):.1f} | {rng.uniform(-2, 19):.1f} "
                     f"| {rng.choice(WIND)} {rng.randint(0, 9)} | {rng.randint(968, 1041)} | {rng.choice(SKY)} "
                     f"| {rng.choice(observers)} |")
    return "\n".join(lines) + "\n"


def name(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.sample(WORDS, parts))


def code(rng: random.Random, units: int = 68) -> str:
    out = ['"""Tide gauge processing: calibration, filtering and reporting for the harbour stations."""',
           "import math", "from dataclasses import dataclass", ""]
    for s in STATIONS:
        out.append(f"{s.upper().replace(' ', '_')}_OFFSET = {rng.uniform(-0.9, 0.9):.4f}  # datum offset, metres")
    out.append("")
    for u in range(units):
        kind = u % 3
        if kind == 0:
            cls = "".join(w.capitalize() for w in rng.sample(WORDS, 2))
            fields = rng.sample(WORDS, 3)
            out += ["", "@dataclass", f"class {cls}:", f'    """{rng.choice(WORDS).capitalize()} record of one '
                    f'{rng.choice(WORDS)} per {rng.choice(WORDS)}."""']
            out += [f"    {f}: float = {rng.uniform(0, 50):.3f}" for f in fields]
            a, b = fields[0], fields[1]
            out += ["", f"    def {name(rng)}(self, scale: float = {rng.uniform(0.5, 2):.2f}) -> float:",
                    f"        return (self.{a} - self.{b}) * scale + {rng.uniform(-3, 3):.3f}"]
        elif kind == 1:
            fn, xs = name(rng), rng.sample(WORDS, 2)
            k = rng.randint(3, 17)
            out += ["", "", f"def {fn}({xs[0]}: list[float], {xs[1]}: float = {rng.uniform(0.01, 0.9):.3f}) -> list[float]:",
                    f'    """Smooth {xs[0]} with a window of {k} samples, clipping at {xs[1]}."""',
                    "    result = []", f"    for i in range(len({xs[0]})):",
                    f"        window = {xs[0]}[max(0, i - {k}):i + 1]",
                    "        mean = sum(window) / len(window)",
                    f"        result.append(min(max(mean, -{xs[1]}), {xs[1]}) * {rng.uniform(0.8, 1.2):.4f})",
                    "    return result"]
        else:
            fn, st = name(rng), rng.choice(STATIONS).upper().replace(" ", "_")
            amp, per = rng.uniform(0.5, 3.5), rng.uniform(11.9, 12.6)
            out += ["", "", f"def {fn}(hour: float) -> float:",
                    f'    """Predicted height at {st.title().replace("_", " ")}, {rng.choice(WORDS)} model."""',
                    f"    phase = 2 * math.pi * hour / {per:.3f}",
                    f"    height = {amp:.3f} * math.cos(phase - {rng.uniform(0, 6.28):.3f}) + {st}_OFFSET",
                    f"    if height > {rng.uniform(2, 5):.2f}:",
                    f'        raise ValueError(f"{fn}: height {{height:.2f}} above the {rng.choice(WORDS)} limit")',
                    "    return height"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    (HERE / "observations_table.txt").write_text(table(random.Random(2024)))
    (HERE / "tidegauge.py.txt").write_text(code(random.Random(7)))
    (HERE / "ledger_long.txt").write_text(table(random.Random(2025), rows=900))
