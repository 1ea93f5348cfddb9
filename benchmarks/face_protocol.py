"""The cross-domain face protocol of issue #23 (docs/training.md, "Cross-domain").

Two face sources, fixed person splits (never chosen by a test score):

- AT&T (``../shared/data/att_faces``): s1-s25 train, s26-s30 validation, s31-s40 test;
- Extended Yale B (``../shared/data/extended_yale_b``, 27 people in sorted name order):
  the first 15 train, the next 5 validation, the last 7 test.

Stage 1 (``features``) caches ImageNet MobileNetV2 features of every photo (and of its mirror
image) per block and input size in /work/cache/face_protocol/; stage 2 (``search``) scores the
candidates on the validation people of both sources; stage 3 (``test``) scores the test people
of both sources once for the untrained backbone, today's pretrained recipe and the chosen one.

    nice -n 10 python benchmarks/face_protocol.py features
    nice -n 10 python benchmarks/face_protocol.py search
    nice -n 10 python benchmarks/face_protocol.py test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tripletlab.data.open import open_data
from tripletlab.losses.triplet import TripletLoss
from tripletlab.metrics import retrieval_metrics, verification_metrics
from tripletlab.models.backbones import BackboneEmbedding
from tripletlab.samplers import PKSampler
from tripletlab.train.build import lr_factor
from tripletlab.train.robust import ALPHA_GRID, SHRINK_GRID, interpolate_state

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
if not DATA.exists():
    DATA = Path("/work/shared/data")
CACHE = Path("/work/cache/face_protocol")
SOURCES = {"att": DATA / "att_faces", "yale": DATA / "extended_yale_b"}
SIZES = ([136, 112], [272, 224])
TAPS = list(range(12, 19))  # MobileNetV2 blocks whose pooled outputs are cached


def att_split(name: str) -> str:
    """AT&T person ``sN``: train N <= 25, validation 26-30, test 31-40."""
    n = int(name[1:])
    return "train" if n <= 25 else "val" if n <= 30 else "test"


def yale_split(names: list[str]) -> dict[str, str]:
    """Extended Yale B people in sorted order: first 15 train, next 5 validation, last 7 test."""
    order = sorted(names, key=lambda s: int(s.replace("yaleB", "")))
    return {n: "train" if i < 15 else "val" if i < 20 else "test" for i, n in enumerate(order)}


def cache_path(source: str, size) -> Path:
    return CACHE / f"{source}_{size[0]}x{size[1]}.pt"


@torch.no_grad()
def extract(source: str, size, batch: int = 32) -> dict:
    """Pooled (average) outputs of MobileNetV2 blocks :data:`TAPS` of every photo and its
    mirror image, with the library's image loading and ImageNet normalisation."""
    src = SOURCES[source]
    if source == "yale" and list(size) == SIZES[1]:  # 272x224: only the validation and test
        src = _non_training_people(src)  # people (the 2-core machine: ~1 s a photo)
    ds, _, _ = open_data(str(src), image_size=size, stream=False, explain=False)
    model = BackboneEmbedding([1, *size], backbone="mobilenet_v2", weights="imagenet",
                              freeze_stages="all", blocks=[TAPS[-1]]).eval()  # fmt: skip
    blocks = model.backbone.blocks()
    out = {"y": ds.y, "classes": ds.classes, "paths": ds.paths, "size": list(size)}
    for mirror in (False, True):
        feats = {b: [] for b in TAPS}
        for i in range(0, len(ds), batch):
            x = ds.x[i : i + batch]
            x = model._normalize_input(x.flip(-1) if mirror else x)
            for j, block in enumerate(blocks[: TAPS[-1] + 1]):
                x = block(x)
                if j in feats:
                    feats[j].append(x.mean(dim=(2, 3)))
        out["mirror" if mirror else "image"] = {b: torch.cat(v) for b, v in feats.items()}
    return out


def _non_training_people(folder: Path) -> Path:
    """A folder of symlinks to the Extended Yale B people outside the training split."""
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    part = yale_split(names)
    out = CACHE / "yale_val_test"
    out.mkdir(parents=True, exist_ok=True)
    for n in names:
        if part[n] != "train" and not (out / n).exists():
            (out / n).symlink_to(folder / n)
    return out


def stage_features() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for size in SIZES:
        for source in SOURCES:
            p = cache_path(source, size)
            if p.exists():
                print(f"{p}: cached")
                continue
            t = time.perf_counter()
            obj = extract(source, size)
            tmp = p.with_suffix(".tmp")
            torch.save(obj, tmp)
            tmp.replace(p)
            print(f"{p}: {len(obj['y'])} photos in {time.perf_counter() - t:.0f} s", flush=True)


# ------------------------------------------------------------------ features of a candidate
def load(source: str, size) -> dict:
    obj = torch.load(cache_path(source, size), weights_only=False)
    names = [obj["classes"][int(c)] for c in obj["y"]]
    everyone = sorted(p.name for p in SOURCES["yale"].iterdir() if p.is_dir())
    split = yale_split(everyone) if source == "yale" else None
    obj["part"] = [att_split(n) if source == "att" else split[n] for n in names]
    return obj


def features(obj: dict, blocks, mirror: bool = False) -> torch.Tensor:
    """What ``BackboneEmbedding(blocks=...)`` computes: each tapped block's pooled output
    L2-normalised, concatenated (``blocks`` None: the final 1280-channel layer, block 18)."""
    f = obj["mirror" if mirror else "image"]
    if blocks is None:
        return f[18].float()
    return torch.cat([F.normalize(f[b].float(), dim=1) for b in blocks], dim=1)


class Part:
    """Features (and mirror features) and labels of one part (train / val / test) of a source."""

    def __init__(self, obj: dict, blocks, part: str, source: str) -> None:
        idx = torch.tensor([i for i, p in enumerate(obj["part"]) if p == part])
        self.x = features(obj, blocks)[idx]
        self.xm = features(obj, blocks, mirror=True)[idx]
        self.y = obj["y"][idx] + (1000 if source == "yale" else 0)
        self.name = f"{source}-{part}"


def head_model(dim: int, out: int) -> BackboneEmbedding:
    """A frozen-backbone model whose head (projection) takes ``dim`` features."""
    m = BackboneEmbedding([1, 32, 32], embedding_dim=out, freeze_stages="all", blocks=[3])
    m.proj = torch.nn.Linear(dim, out)
    m.num_features = dim
    m.tta = "flip"
    return m


@torch.no_grad()
def embed(m: BackboneEmbedding, part: Part) -> torch.Tensor:
    m.eval()
    return m.head(part.x, part.xm).float()  # tta flip: the image's and the mirror's summed


def score(m: BackboneEmbedding, part: Part) -> dict:
    emb = embed(m, part)
    v = verification_metrics(emb, part.y, distance="cosine", max_pairs=None)
    r = retrieval_metrics(emb, part.y, ks=(1,), nmi=False)
    return {"auc": round(float(v["roc_auc"]), 4), "eer": round(float(v["eer"]), 4),
            "map_at_r": round(float(r["map_at_r"]), 4)}  # fmt: skip


def old_whitening(m: BackboneEmbedding, f: torch.Tensor, shrink: float = 0.1) -> None:
    """The head's whitening before issue #23 (b7c61f9): ``1 / sqrt(var + 0.1 mean(var[:d]))``
    on the top ``d`` axes (today's recipe)."""
    mu = f.mean(0)
    _, s, vt = torch.linalg.svd(f - mu, full_matrices=False)
    d = int(min(m.proj.out_features, int((s > s[0] * 1e-6).sum())))
    var = s[:d] ** 2 / len(f)
    w = torch.zeros_like(m.proj.weight)
    w[:d] = vt[:d] / (var + shrink * var.mean()).sqrt()[:, None]
    with torch.no_grad():
        m.proj.weight.copy_(w)
        m.proj.bias.copy_(-(w @ mu))


def train_head(m, train: list[Part], steps=300, lr=3e-4, seed=0, select=None):
    """The frozen path's head training (Trainer defaults: PK 16x4, semihard, margin 0.2,
    AdamW wd 1e-4, 50 warm-up steps then cosine, mirror features drawn at random);
    ``select(m) -> score``: the best validated step's weights are returned (every 25 steps)."""
    torch.manual_seed(seed)
    x = torch.cat([p.x for p in train])
    xm = torch.cat([p.xm for p in train])
    y = torch.cat([p.y for p in train])
    y = torch.unique(y, return_inverse=True)[1]
    loss_fn = TripletLoss(margin=0.2, strategy="semihard", seed=seed + 3)
    opt = torch.optim.AdamW(m.param_groups(lr), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 50, steps))
    sampler = PKSampler(y, p=16, k=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 4)
    best, best_state, step = -1.0, None, 0
    while step < steps:
        for idx in sampler:
            idx = torch.as_tensor(idx)
            flip = (torch.rand(len(idx), generator=g) < 0.5)[:, None]
            m.train()
            emb = m.head(torch.where(flip, xm[idx], x[idx]))
            opt.zero_grad()
            loss_fn(emb, y[idx]).backward()
            opt.step()
            sched.step()
            step += 1
            if select is not None and (step % 25 == 0 or step == steps):
                sc = select(m)
                if sc >= best:
                    best, best_state = sc, {k: v.clone() for k, v in m.state_dict().items()}
            if step >= steps:
                break
    return best_state if best_state is not None else m.state_dict()


def combined(scores: dict) -> float:
    """The selection score: the mean of the verification AUCs on the validation people of
    AT&T (s26-s30) and of Extended Yale B (5 people): one in-domain, one cross-domain."""
    return round((scores["att-val"]["auc"] + scores["yale-val"]["auc"]) / 2, 4)


def stage_search(out: Path) -> None:
    torch.set_num_threads(1)
    rows = []
    sizes = [s for s in SIZES if all(cache_path(src, s).exists() for src in SOURCES)]
    block_sets = ([15, 16], [14, 15, 16], [13, 14, 15, 16], [16], [17], None)

    def report(row):
        row["val"] = combined(row)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for size in sizes:
        objs = {src: load(src, size) for src in SOURCES}
        for blocks in block_sets:
            parts = {f"{src}-{p}": Part(objs[src], blocks, p, src)
                     for src in SOURCES for p in ("train", "val")}  # fmt: skip
            val = [parts["att-val"], parts["yale-val"]]
            dim = parts["att-val"].x.shape[1]
            m = head_model(dim, dim)
            m.init_identity()
            base = {"size": size, "blocks": blocks}
            report({**base, "head": "untrained", **{p.name: score(m, p) for p in val}})
            if blocks not in ([15, 16], [14, 15, 16], [13, 14, 15, 16]):
                continue
            both = [parts["att-train"], parts["yale-train"]]
            for train_name, train in (("att", [parts["att-train"]]), ("att+yale", both)):
                fit = torch.cat([torch.cat([p.x, p.xm]) for p in train])
                out_dim = min(dim, 512)
                m = head_model(dim, out_dim)
                if train_name == "att":
                    old_whitening(m, fit)
                    report({**base, "train": train_name, "head": "whiten-old(b7c61f9)",
                            **{p.name: score(m, p) for p in val}})  # fmt: skip
                for power in (0.5, 0.25):
                    for shrink in (*SHRINK_GRID, None):
                        m.init_whitening(fit, shrink=shrink, power=power)
                        report({**base, "train": train_name, "head": "whiten",
                                "shrink": round(m.whiten_shrink, 4), "lw": shrink is None,
                                "power": power, **{p.name: score(m, p) for p in val}})  # fmt: skip
    atomic = out.with_suffix(".tmp")
    atomic.write_text(json.dumps(rows, indent=1))
    atomic.replace(out)


def stage_heads(out: Path) -> None:
    """Triplet-trained heads on top of the best whitening of each training-source choice,
    their step and the WiSE-FT alpha chosen on the combined validation score."""
    torch.set_num_threads(1)
    rows = []
    size = SIZES[0]
    objs = {src: load(src, size) for src in SOURCES}
    configs = [  # (train sources, blocks, shrink): the best whitening of each in stage 2
        ("att", [15, 16], 0.3),
        ("att+yale", [13, 14, 15, 16], 0.1),
    ]
    for train_name, blocks, shrink in configs:
        parts = {f"{src}-{p}": Part(objs[src], blocks, p, src)
                 for src in SOURCES for p in ("train", "val")}  # fmt: skip
        val = [parts["att-val"], parts["yale-val"]]
        train = [parts["att-train"]] + ([parts["yale-train"]] if "yale" in train_name else [])
        fit = torch.cat([torch.cat([p.x, p.xm]) for p in train])
        dim = fit.shape[1]
        m = head_model(dim, min(dim, 512))
        m.init_whitening(fit, shrink=shrink)
        start = {k: v.clone() for k, v in m.state_dict().items()}

        def val_score(model, val=val):
            return combined({p.name: score(model, p) for p in val})

        for lr in (3e-4, 1e-3):
            m.load_state_dict(start)
            trained = train_head(m, train, steps=300, lr=lr, select=val_score)
            for alpha in ALPHA_GRID:
                m.load_state_dict(interpolate_state(start, trained, alpha))
                row = {"size": size, "blocks": blocks, "train": train_name, "shrink": shrink,
                       "lr": lr, "alpha": alpha, **{p.name: score(m, p) for p in val}}  # fmt: skip
                row["val"] = combined(row)
                rows.append(row)
                print(json.dumps(row), flush=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)


def _best(rows: list[dict], **where) -> dict:
    """The row with the highest combined validation score among ``where``; a tie keeps the
    earlier (simpler: smaller alpha, lower lr) one."""
    rows = [r for r in rows if all(r.get(k) == v for k, v in where.items())]
    best = rows[0]
    for r in rows[1:]:
        if r["val"] > best["val"]:
            best = r
    return best


def _test_parts(size, blocks) -> dict[str, Part]:
    return {f"{src}-test": Part(load(src, size), blocks, "test", src) for src in SOURCES}


def stage_test(out: Path) -> None:
    """Score the test people of both sources once for each model; every choice was made on
    validation (search_whitening.json, search_heads.json)."""
    torch.set_num_threads(1)
    heads = json.loads((CACHE / "search_heads.json").read_text())
    results = []

    def record(name, m, size, blocks, note):
        row = {"model": name, "size": size, "blocks": blocks, "note": note}
        row.update({n: score(m, p) for n, p in _test_parts(size, blocks).items()})
        results.append(row)
        print(json.dumps(row), flush=True)

    # 1. the untrained backbone: global average pool of the final layer, cosine, flip
    size = SIZES[0]
    obj = load("att", size)
    m = head_model(features(obj, None).shape[1], features(obj, None).shape[1])
    m.init_identity()
    record("untrained backbone", m, size, None, "no training; final 1280-d layer, GAP, flip")
    # 2. today's recipe: --backbone mobilenet_v2 --pretrained defaults, trained on s1-s25
    size, blocks = SIZES[1], [15, 16]
    att = load("att", size)
    train, val = Part(att, blocks, "train", "att"), Part(att, blocks, "val", "att")
    m = head_model(train.x.shape[1], train.x.shape[1])
    old_whitening(m, torch.cat([train.x, train.xm]))
    m.load_state_dict(train_head(m, [train], select=lambda h: score(h, val)["map_at_r"]))
    record("today's pretrained recipe", m, size, blocks,
           "272x224, blocks 15 16, ridge whitening, 300 steps, step on AT&T val MAP@R")  # fmt: skip
    # 3. the chosen recipes (one per training-source choice), everything from validation
    for train_name in ("att", "att+yale"):
        best = _best(heads, train=train_name)
        size, blocks = best["size"], best["blocks"]
        objs = {src: load(src, size) for src in SOURCES}
        parts = {f"{src}-{p}": Part(objs[src], blocks, p, src)
                 for src in SOURCES for p in ("train", "val")}  # fmt: skip
        train = [parts["att-train"]] + ([parts["yale-train"]] if "yale" in train_name else [])
        vals = [parts["att-val"], parts["yale-val"]]
        fit = torch.cat([torch.cat([p.x, p.xm]) for p in train])
        m = head_model(fit.shape[1], min(fit.shape[1], 512))
        m.init_whitening(fit, shrink=best["shrink"])
        start = {k: v.clone() for k, v in m.state_dict().items()}

        def on_val(h, v=vals):
            return combined({p.name: score(h, p) for p in v})

        trained = train_head(m, train, lr=best["lr"], select=on_val)
        m.load_state_dict(interpolate_state(start, trained, best["alpha"]))
        record(f"new recipe, trained on {train_name}", m, size, blocks,
               f"whiten shrink {best['shrink']}, lr {best['lr']}, alpha {best['alpha']}, "
               f"val {best['val']}")  # fmt: skip
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["features", "search", "heads", "test"])
    args = ap.parse_args(argv)
    if args.stage == "features":
        stage_features()
    elif args.stage == "search":
        stage_search(CACHE / "search_whitening.json")
    elif args.stage == "heads":
        stage_heads(CACHE / "search_heads.json")
    elif args.stage == "test":
        stage_test(CACHE / "test.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
