"""Checkpoints written by fastsae, read back by SAELens itself.

Two steps, in two environments:

1. ``python make_roundtrip.py write [OUT_DIR]`` (fastsae's environment):
   trains three tiny SAEs on the built-in synthetic problem (``relu`` saved as
   SAELens ``standard``, ``topk``, and ``batchtopk`` saved for inference as
   ``jumprelu``) and writes each with ``SparseAutoencoder.save`` plus an
   input ``x.npy``.
2. ``python make_roundtrip.py saelens [OUT_DIR]`` (a venv with torch and
   sae-lens, no fastsae): loads every folder with SAELens's own
   ``SAE.load_from_disk`` and stores its ``encode`` / ``decode`` outputs as
   ``saelens_f.npy`` and ``saelens_x_hat.npy``.

``tests/test_saelens_format.py`` then checks in CI, without SAELens, that
fastsae's outputs on these files equal SAELens's, and that fastsae still
writes the same layout. Environment used for step 2 (2026-11-25): Python
3.11.7, torch 2.13.0+cpu, sae-lens 6.54.12; set it up with

    python3 -m venv /tmp/saefix/venv
    /tmp/saefix/venv/bin/pip install torch==2.13.0 sae-lens==6.54.12
    HF_HUB_OFFLINE=1 /tmp/saefix/venv/bin/python make_roundtrip.py saelens
"""

import json
import sys
from pathlib import Path

import numpy as np

NAMES = ("relu", "topk", "batchtopk")


def write(out: Path) -> None:
    from fastsae import SparseAutoencoder
    from fastsae.data import synthetic
    from fastsae import TrainConfig, Trainer

    ds = synthetic(n_rows=4096, d_in=16, n_features=48, l0=3.0, seed=7)
    x = ds.x[:32].copy()
    for name in NAMES:
        kw = {} if name == "relu" else {"activation": name, "k": 3}
        m = SparseAutoencoder(16, 64, backend="numpy", seed=11, **kw)
        cfg = TrainConfig(steps=100, batch_size=128, lr_warmup_steps=3, progress=False,
                          eval_rows=512, topk_threshold_lr=0.2, l1_coefficient=1.0,
                          l1_warmup_steps=10)
        r = Trainer(m, ds.x, cfg).train()
        d = out / name
        r.model.save(d)
        np.save(d / "x.npy", x)
        print(name, "->", d, json.loads((d / "cfg.json").read_text())["architecture"])


def saelens(out: Path) -> None:
    import torch
    from sae_lens import SAE

    for name in NAMES:
        d = out / name
        sae = SAE.load_from_disk(str(d), device="cpu")
        x = torch.from_numpy(np.load(d / "x.npy"))
        with torch.no_grad():
            f = sae.encode(x)
            x_hat = sae.decode(f)
        np.save(d / "saelens_f.npy", f.numpy().astype(np.float32))
        np.save(d / "saelens_x_hat.npy", x_hat.numpy().astype(np.float32))
        print(name, type(sae).__name__, "L0", float((f > 0).sum(-1).float().mean()))


if __name__ == "__main__":
    step = sys.argv[1]
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent
    {"write": write, "saelens": saelens}[step](out)
