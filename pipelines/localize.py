"""`p2d localize`: make (or take) a task model, score every head with ALPS, keep the top heads."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2d import P2DError
from p2d.alps import METRICS, VARIANTS
from p2d.cards import DOMAINS
from p2d.config import check_choices, option
from p2d.geometry import AttentionGeometry
from p2d.io import read_json, save_npy, write_json
from p2d.models import DEFAULT_MODEL, MODEL_HELP, load_config, resolve_model
from p2d.proxy import ProxyConfig
from p2d.selection import METHODS

console = Console(stderr=True)


@dataclass
class LocalizeConfig:
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    task_model: str | None = option(None, "A ready fine-tuned model of the same architecture (no proxy run).")
    domain: str | None = option(None, "Domain whose data card gives the proxy data.", choices=DOMAINS)
    proxy_data: str | None = option(None, "Data file (or hub id) for the proxy fine-tune (default: the domain "
                                          "card's training data).")
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    head_frac: float = option(0.1, "Fraction r of heads kept: top ceil(r*n).")
    metric: str = option("w1", "How far a head's weights moved: w1 (ALPS's Wasserstein-1), kl, cosine, euclidean.",
                         choices=METRICS)
    tau: float = 1.0
    variant: str = option("alps", "alps: W_o^h = Q_h^T K_g V_g^T as in the paper; qkv-concat: the q/k/v slices "
                                  "side by side.", choices=VARIANTS)
    method: str = option("top", "top: global top-k (ALPS); lc: same count per layer; random: baseline.",
                         choices=METHODS, flag="--head-method")
    seed: int = 0

    def validate(self) -> None:
        """Fail on bad options before any expensive work starts."""
        check_choices(self)
        check_choices(self.proxy)
        if not 0 < self.head_frac <= 1:
            raise P2DError(f"--head-frac must be in (0, 1], got {self.head_frac}")
        if not self.tau > 0:
            raise P2DError(f"--tau must be positive, got {self.tau}")
        if self.proxy.samples <= 0 or self.proxy.steps <= 0:
            raise P2DError(f"--proxy-samples and --proxy-steps must be positive, got {self.proxy.samples} and "
                           f"{self.proxy.steps}")
        if not (self.task_model or self.domain or self.proxy_data):
            raise P2DError("localize needs a task model: pass --task-model, --domain or --proxy-data")


def proxy_source(cfg: LocalizeConfig) -> str:
    from p2d.cards import load_card

    return cfg.proxy_data or load_card(cfg.domain).train_source()


def proxy_key(cfg: LocalizeConfig) -> str:
    """What a cached proxy task model was made from: the base's and the data's content, and the proxy options."""
    import hashlib
    import json
    from dataclasses import asdict

    from p2d.io import input_digest
    from p2d.models import model_digest

    blob = {"model": model_digest(cfg.model), "data": input_digest(proxy_source(cfg)), "proxy": asdict(cfg.proxy)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def make_task_model(cfg: LocalizeConfig, out_dir: Path, progress: bool = True) -> str:
    """The task model: the user's, or a proxy fine-tune on the domain's data (cached in out_dir/proxy,
    reused only while base, data and proxy options are those it was made from)."""
    if cfg.task_model:
        return resolve_model(cfg.task_model)
    from p2d.data import load_examples, text_template
    from p2d.proxy import run_proxy

    task_dir, record = out_dir / "proxy" / "task_model", out_dir / "proxy" / "proxy.json"
    key = proxy_key(cfg)
    if (task_dir / "config.json").is_file() and record.is_file() and read_json(record).get("key") == key:
        return str(task_dir)
    source = proxy_source(cfg)
    examples = load_examples(source, template=text_template(cfg.proxy.template, _card_text(cfg)), domain=cfg.domain,
                             limit=cfg.proxy.samples)
    console.print(f"[bold]proxy[/] fine-tuning {cfg.model} on {len(examples)} samples of {source} "
                  f"({cfg.proxy.steps} steps, scope {cfg.proxy.scope})")
    return str(run_proxy(cfg.model, examples, out_dir / "proxy", cfg.proxy, progress=progress, key=key))


def _card_text(cfg: LocalizeConfig) -> str:
    """The text template of the domain's card (used where no chat template applies)."""
    from p2d.cards import load_card

    return load_card(cfg.domain).template if cfg.domain and not cfg.proxy_data else "alpaca"


def score_and_select(cfg: LocalizeConfig, task_model: str, out_dir: Path) -> Path:
    """Score every head of base vs task, keep the top ⌈r·n⌉, write heads.json, head_scores.npy, heads.png."""
    from p2d.alps import score_heads
    from p2d.plots import plot_head_scores
    from p2d.selection import select_heads, write_heads_json

    base_dir = resolve_model(cfg.model)
    geom = AttentionGeometry.from_config(load_config(base_dir))
    geom.check_same(AttentionGeometry.from_config(load_config(task_model)), f"task model {task_model}")
    scores = score_heads(base_dir, task_model, metric=cfg.metric, tau=cfg.tau, variant=cfg.variant)
    selected = select_heads(scores, cfg.head_frac, method=cfg.method, seed=cfg.seed)
    save_npy(out_dir / "head_scores.npy", scores)
    heads_path, record = out_dir / "heads.json", out_dir / "proxy" / "proxy.json"
    template = read_json(record).get("template") if not cfg.task_model and record.is_file() else None
    write_heads_json(heads_path, scores, selected, geom, model=cfg.model, task_model=str(task_model),
                     metric=cfg.metric, tau=cfg.tau, head_frac=cfg.head_frac, method=cfg.method, template=template)
    plot_head_scores(scores, selected, out_dir / "heads.png",
                     title=f"ALPS {cfg.metric} scores, {len(selected)} of {scores.size} heads selected")
    return heads_path


def heads_table(heads_path: Path, top: int = 10) -> Table:
    info = read_json(heads_path)
    table = Table(title=f"top heads ({len(info['selected'])} selected of "
                        f"{info['num_layers'] * info['num_heads']}, metric {info['metric']})")
    for col in ("rank", "layer", "head", "kv group", "score"):
        table.add_column(col, justify="right")
    for s in info["selected"][:top]:
        table.add_row(str(s["rank"]), str(s["layer"]), str(s["head"]), str(s["kv_group"]), f"{s['score']:.3e}")
    return table


def localize(cfg: LocalizeConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the whole localize command; returns the timings written to out_dir/localize.json."""
    cfg.validate()
    out_dir = Path(out_dir)
    start = time.perf_counter()
    task_model = make_task_model(cfg, out_dir, progress)
    proxy_s = time.perf_counter() - start
    start = time.perf_counter()
    heads_path = score_and_select(cfg, task_model, out_dir)
    timings = {"proxy_seconds": proxy_s, "localize_seconds": time.perf_counter() - start,
               "task_model": task_model, "heads": str(heads_path)}
    write_json(out_dir / "localize.json", timings)
    console.print(heads_table(heads_path))
    return timings
