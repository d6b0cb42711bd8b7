"""axolotl reads p2d's axolotl.yaml as p2d means it: its own validator accepts the config, and its own
freezing code (`freeze_layers_except`, which `unfrozen_parameters` drives) leaves trainable exactly
the rows p2d's heads scope trains.

`p2d mine` writes axolotl.yaml for a small CodeAlpaca pool with the given heads; then, with axolotl's
code: `validate_config` on the file, and on SmolLM2 `freeze_layers_except(model, unfrozen_parameters)`,
a backward pass, and the rows that got a gradient, against the rows p2d's `heads` scope trains.
axolotl is no dependency of p2d (it pulls a CUDA stack); its pure-Python package suffices here:

    pip install --no-deps --target /tmp/axolotl axolotl addict
    PYTHONPATH=/tmp/axolotl python benchmarks/axolotl_check.py --heads runs/sel-code/heads.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit  # noqa: E402
from pools import default_data_root  # noqa: E402

from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.masking import HeadDeltaLinear, apply_scope  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.pipelines.mine import MineConfig, mine_pool  # noqa: E402
from p2d.selection import read_heads_json  # noqa: E402


def rows_with_gradient(model) -> dict[str, set[int]]:
    """Rows of each parameter that a backward pass (through axolotl's freezing hooks) gave a gradient."""
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: set(torch.nonzero(p.grad.reshape(p.shape[0], -1).abs().sum(1)).flatten().tolist())
            for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=Path, required=True, help="heads.json of `p2d localize --domain code`")
    ap.add_argument("--rows", type=int, default=100, help="CodeAlpaca rows in the pool mined")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.freeze import freeze_layers_except

    out = Path(tempfile.mkdtemp(prefix="p2d-axolotl-"))
    rows = json.loads((default_data_root() / "code/code_alpaca_2k.json").read_text())[: args.rows]
    (out / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mine_pool(MineConfig(heads=str(args.heads), data=str(out / "pool.jsonl"), domain="code", data_frac=0.2),
              out / "mine", progress=False)
    written = yaml.safe_load((out / "mine" / "axolotl.yaml").read_text())
    cfg = validate_config(DictDefault(written))  # raises on a config axolotl would refuse

    model, _ = load_model(written["base_model"], dtype=torch.float32)
    freeze_layers_except(model, cfg.unfrozen_parameters)
    got = rows_with_gradient(model)
    scoped, _ = load_model(written["base_model"], dtype=torch.float32)
    heads = read_heads_json(args.heads).heads
    apply_scope(scoped, AttentionGeometry.from_config(scoped.config), "heads", heads)
    want = {f"{name}.weight": set(m.index.tolist()) for name, m in scoped.named_modules()
            if isinstance(m, HeadDeltaLinear)}
    same = got == want
    result = {"axolotl": version("axolotl"), "heads": len(heads), "patterns": len(cfg.unfrozen_parameters),
              "parameters_with_gradient": len(got), "rows_with_gradient": sum(map(len, got.values())),
              "rows_p2d_trains": sum(map(len, want.values())), "same_rows": same,
              "validated": {k: written[k] for k in ("sequence_len", "num_epochs", "learning_rate", "weight_decay")}}
    print(json.dumps(result, indent=1))
    md = "\n".join([
        f"axolotl {result['axolotl']} (its pure-Python package); SmolLM2-135M, fp32.",
        "",
        f"- axolotl's `validate_config` accepts the `axolotl.yaml` that `p2d mine` wrote ({len(rows)} CodeAlpaca rows, "
        f"{len(heads)} ALPS heads).",
        f"- Its `freeze_layers_except` with the file's {result['patterns']} `unfrozen_parameters` patterns, then one "
        f"backward pass: {result['rows_with_gradient']:,} rows in {result['parameters_with_gradient']} weights get a "
        f"gradient; p2d's heads scope trains {result['rows_p2d_trains']:,} rows: "
        + ("**the same rows**." if same else "**not the same rows**."),
    ])
    emit("axolotl_check", "axolotl reads axolotl.yaml as p2d means it", md, result, out if args.no_publish else None)
    if not same:
        raise SystemExit("axolotl unfreezes other rows than p2d's heads scope trains")


if __name__ == "__main__":
    main()
