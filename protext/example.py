"""The built-in example: twelve real photos, and the whole pipeline run on them with one loaded model.

The photos ship with scikit-image (astronaut, cat, coffee, rocket, …), one class each. :func:`run`
goes stage by stage: class descriptions (offline templates, or an LLM), ProText prompts trained on
them, then zero-shot classification with CLIP's template, the CuPL ensemble and the learned prompts,
and every test-time adaptation method of the registry (TPT, C-TPT, O-TPT, ZERO, TDA, MTA, DMN-ZS, DPE,
BoostAdapter, TPS; not the oracle ``dmn-oracle``) on the learned prompts. Every stage is a library
call; the equivalent command line of each is printed before it runs. The command line is
``python -m protext.quickstart``.

Each adaptation row's settings are :func:`tta_row_options`: ``--tta-views`` (8) views where the
method takes several, in a recipe another row already encodes (so the feature memo shares them),
one view where the method's published setting here is one (TDA, DPE) or where its own crops would
be the only ones of their kind (DMN-ZS, as OGA runs it); a value the folder has no published entry
for is ImageNet's.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

EXAMPLE_PHOTOS: dict[str, str] = {
    # class name -> skimage.data function; one real photograph per class
    "astronaut": "astronaut",
    "cat": "chelsea",
    "cup_of_coffee": "coffee",
    "rocket": "rocket",
    "brick_wall": "brick",
    "grass": "grass",
    "gravel": "gravel",
    "clock": "clock",
    "coins": "coins",
    "moon": "moon",
    "galaxy": "hubble_deep_field",
    "horse": "horse",
}

def _shown_methods() -> tuple[str, ...]:
    from .tta import registry  # torch-free: the declarations only

    return tuple(name for name in registry.names() if not registry.get(name).oracle)


#: the adaptation methods shown, each on the learned prompts: every method of the registry, in its
#: order, but an oracle (``dmn-oracle`` picks its fusion weight on the test labels: not a test-time method)
TTA_SHOWN = _shown_methods()

#: methods shown with one view although they take several: their own view recipe would be encoded for
#: them alone (the memo shares nothing), and one view is a setting they are run with elsewhere
ONE_VIEW: dict[str, str] = {
    "dmn": "DMN-ZS's crops keep at least half the image, a recipe no other row draws; one view, as OGA's runs of DMN-ZS",
}


@dataclass
class QuickstartConfig:
    """Settings of the example run (see ``--help``)."""

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    workdir: Path = Path("quickstart")
    device: str = "auto"
    precision: str = "auto"
    epochs: int = 10
    depth: Optional[int] = None
    tta_views: int = 8
    llm_model: Optional[str] = None
    llm_base_url: Optional[str] = None
    seed: int = 0
    fresh: bool = False
    share_encodings: bool = True

    def identity(self) -> dict[str, Any]:
        """The settings a finished stage's output depends on: a rerun with the same ones resumes."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items() if k not in ("workdir", "fresh", "share_encodings")}


def write_example_images(root: Path) -> list[str]:
    """Save the example photos as ``root/<class>/<function>.png``; returns the class names."""
    try:
        import numpy as np
        import skimage.data
        from PIL import Image
    except ImportError:
        from .errors import UserError

        raise UserError(
            "the example photos come from scikit-image: pip install scikit-image "
            "(it is in protext's 'dev' and 'example' extras)"
        ) from None
    for classname, function in EXAMPLE_PHOTOS.items():
        folder = root / classname
        target = folder / f"{function}.png"
        if target.exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        pixels = getattr(skimage.data, function)()
        if pixels.dtype == bool:  # the horse is a binary silhouette
            pixels = np.where(pixels, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).convert("RGB").save(target)
    return list(EXAMPLE_PHOTOS)


def _say(command: str, argv: Sequence[Any]) -> None:
    print(f"\n$ {command} {' '.join(shlex.quote(str(a)) for a in argv)}", flush=True)


def describe(cfg: QuickstartConfig, classes: list[str], out: Path, class_file: Path) -> None:
    """Stage 1: class descriptions (offline templates unless an LLM is named); ``class_file`` gets
    the class list, so that the command printed runs as printed. An interrupted generation resumes."""
    from .descriptions import GenConfig, generate

    class_file.write_text("".join(f"{name}\n" for name in classes))
    backend = ["--model", cfg.llm_model] if cfg.llm_model else ["--backend", "templates"]
    base_url = ["--base-url", cfg.llm_base_url] if cfg.llm_base_url else []
    _say("python -m protext.gen_descriptions", ["--classes", class_file, *backend, *base_url, "--out", out])
    gen = GenConfig(
        classes=classes,
        out=out,
        backend="openai" if cfg.llm_model else "templates",
        model=cfg.llm_model,
        base_url=cfg.llm_base_url,
        progress=False,
    )
    report = generate(gen)
    if report.failed:
        from .errors import UserError

        raise UserError(f"description generation failed for {len(report.failed)} classes; see the messages above")


def train_prompts(cfg: QuickstartConfig, clip, descriptions: Path, out: Path, resume: bool = False) -> None:
    """Stage 2: ProText prompts from the descriptions alone (the cross-dataset preset, shortened).

    ``resume``: this workdir's earlier run had the same settings, so a finished checkpoint is kept
    and an interrupted training continues from its resume state.
    """
    from .training import TrainJob, run_training, side_paths

    # --depth only when given: else the preset's 9, which training lowers to a shallower tower's
    # blocks (tiny-clip has 2) by its one rule, in one line (protext.architectures.fit_prompts)
    depth = ["--depth", cfg.depth] if cfg.depth is not None else []
    # the preset's batch of 256 holds every description of the example (84 with the offline templates),
    # kept as one step per epoch (--keep-last-batch): each step encodes each class prompt once
    # whatever the batch size, so this is a third of the steps that batches of 32 took
    _say("python -m protext.train", [
        "--descriptions", descriptions, "--preset", "cross_dataset", *depth, "--epochs", cfg.epochs,
        "--warmup-epochs", 1, "--keep-last-batch", "--model", cfg.model,
        "--pretrained", cfg.pretrained, "--device", cfg.device, "--seed", cfg.seed, "--out", out, "--overwrite",
    ])
    files = side_paths(out)
    if resume and out.is_file() and files["history"].is_file():  # the history is written last
        print(f"quickstart: kept the finished prompts {out}", flush=True)
        return
    resume = resume and files["state"].is_file()
    job = TrainJob(
        descriptions=descriptions, preset="cross_dataset", depth=cfg.depth, epochs=cfg.epochs, warmup_epochs=1, out=out,
        overwrite=not resume, resume=resume, model=cfg.model, pretrained=cfg.pretrained, device=cfg.device,
        seed=cfg.seed, keep_last_batch=True,
    )
    outcome = run_training(job, clip=clip, progress=False, report=lambda line: None)
    if not outcome.complete:
        from .errors import UserError

        raise UserError(f"quickstart: training stopped: {outcome.message}")
    if outcome.depth_note:  # the one line of the run the quickstart shows: the depth it trained with
        print(f"quickstart: {outcome.depth_note}", flush=True)
    resumed = f", resumed after epoch {outcome.resumed_from}" if outcome.resumed_from else ""
    print(f"quickstart: trained prompts, {len(outcome.history)} epochs, final loss {outcome.final_loss:.4g}, "
          f"{outcome.seconds:.0f} s{resumed}", flush=True)


def row_configs(cfg: QuickstartConfig, images: Path, descriptions: Path, checkpoint: Path, results: Path,
                resume: bool = False) -> list[tuple[str, Any]]:
    """Every row's :class:`~protext.evaluation.EvalConfig`, validated: a setting no row can run with
    (say ``--tta-views 3``, which MTA cannot use) is one error line before any work starts."""
    from .evaluation import EvalConfig
    from .evaluation.adapters import validate_tta

    base = EvalConfig(
        dataset="folder", root=str(images), model=cfg.model, pretrained=cfg.pretrained, device=cfg.device,
        precision=cfg.precision, seed=cfg.seed, workers=0, overwrite=not resume, progress=False,
    )
    runs = example_runs(cfg, base, descriptions, checkpoint)
    for label, config in runs:
        config.out = str(results / f"{label}.json")
        config.validate()
        validate_tta(config, config.dataset)
    return runs


def evaluate_all(clip, runs: Sequence[tuple[str, Any]]) -> list[dict]:
    """Stage 3: every class-feature method, then every adaptation method on the learned prompts.

    One line per finished row, so a log shows progress without a terminal. Rows whose result is
    already in place (same settings and inputs: a resumed run) are read back, not recomputed, and an
    interrupted row continues from its per-image log.
    """
    import time

    from . import evaluation

    rows = []
    for number, (label, config) in enumerate(runs, 1):
        _say("python -m protext.eval", config.command_line())
        start = time.perf_counter()
        payload = evaluation.evaluate(config, clip=clip, progress=False)
        metrics, timing = payload["metrics"], payload["timing"]
        tta = payload.get("tta") or {}
        rows.append({
            "method": label,
            "views": tta.get("settings", {}).get("views"),  # None: a zero-shot row (one centre crop)
            "top1": metrics["top1"],
            "top5": metrics["top5"],
            "ece": metrics["ece"],
            "n_images": metrics["n_images"],
            "seconds_per_image": timing["seconds_per_image"],
        })
        print(f"quickstart: row {number}/{len(runs)} {label}: top-1 {metrics['top1']:.2f} %, "
              f"{timing['seconds_per_image']:.2f} s/image, {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def example_runs(cfg: QuickstartConfig, base, descriptions: Path, checkpoint: Path) -> list[tuple[str, Any]]:
    """The rows of the summary, each an :class:`~protext.evaluation.EvalConfig` derived from ``base``."""
    runs = [
        ("clip", replace(base, method="clip")),
        ("cupl", replace(base, method="cupl", descriptions=str(descriptions))),
        ("prompts", replace(base, method="prompts", prompts=str(checkpoint))),
    ]
    for method in TTA_SHOWN:
        config = replace(base, method="prompts", prompts=str(checkpoint), tta=method)
        runs.append((f"prompts+{method}", config.with_tta_values(tta_row_options(method, base.dataset, cfg.tta_views))))
    return runs


def tta_row_options(method: str, dataset: str, views: int) -> dict[str, Any]:
    """The options (by flag dest) the quickstart sets for ``method``'s row; the rest are its defaults.

    * views: the method's own count where that is one view on this dataset (TDA; DPE outside the
      ImageNet family), one view for the methods in :data:`ONE_VIEW`, else ``views``. With 8 views
      the recipes are TPT's (AugMix: TPT, C-TPT, O-TPT, TPS) or ZERO's (no AugMix: ZERO, MTA,
      BoostAdapter), so each row after the first of its recipe reads encodings the memo holds;
    * BoostAdapter boosts with ``int(views x 0.1)`` views, none below 10 views: with fewer, the
      share is ``1 / views``, so that its most confident view boosts (as published with 10 to 19);
    * an option the dataset has no published value for (a folder's TDA (alpha, beta), BoostAdapter's
      delta, DPE's five) takes ImageNet's.
    """
    from .tta import registry

    here, imagenet = registry.context(dataset), registry.context("imagenet")
    declared = registry.get(method)
    options: dict[str, Any] = {}
    for field_name, opt in registry.options(declared):
        key = registry.dest(opt.flag)
        if field_name == "views":
            own = opt.resolve(here)
            if method in ONE_VIEW:
                options[key] = 1
            elif own != 1:
                options[key] = views
        elif opt.resolve(here) is registry.NO_DEFAULT:
            options[key] = opt.resolve(imagenet)
    if method == "boost":  # protext.tta.boost.n_boosting's rule, int(n x share), without importing torch
        share = next(opt for name, opt in registry.options(declared) if name == "selection").resolve(here)
        count = options.get("tta_views", views)
        if count > 1 and int(count * share) == 0:
            options["tta_selection"] = 1 / count
    return options


def run(cfg: QuickstartConfig) -> list[dict]:
    """Run every stage; returns one summary row per evaluated method (also in ``results/summary.json``).

    A rerun in the same workdir with the same settings resumes: finished descriptions, prompts and
    rows are kept (an interrupted stage continues where it stopped). Other settings, or ``fresh``,
    start afresh, and a line says why.
    """
    import json

    from .atomic import atomic_write
    import contextlib

    from .devices import resolve_device
    from .feature_memo import FeatureMemo, remember_image_features
    from .models import load_clip

    work = cfg.workdir
    images = work / "images"
    descriptions = work / "llm_data" / "example.jsonl"
    checkpoint = work / "checkpoints" / "example.safetensors"
    results = work / "results"
    runs = row_configs(cfg, images, descriptions, checkpoint, results)
    resume = _resume_or_start_afresh(cfg, [descriptions.parent, checkpoint.parent, results])
    for _, config in runs:
        config.overwrite = not resume
    names = write_example_images(images)
    describe(cfg, names, descriptions, work / "classes.txt")

    device = resolve_device(cfg.device)
    print(f"\nloading {cfg.model} ({cfg.pretrained}) once for every stage", flush=True)
    clip = load_clip(cfg.model, cfg.pretrained, device=device, seed=cfg.seed)
    if cfg.precision == "auto":
        from .hardware import auto_precision

        precision, why = auto_precision(device.type)
        print(f"quickstart: precision auto: {precision} ({why})", flush=True)
    train_prompts(cfg, clip, descriptions, checkpoint, resume=resume)
    # the rows share pixels (every zero-shot row encodes the same crops; TPT, C-TPT, O-TPT and TPS draw
    # the same seeded AugMix views, ZERO, MTA and BoostAdapter the same plain ones, TDA, DMN-ZS and DPE
    # view 0 alone): each distinct batch goes through the image tower once, exactly
    with remember_image_features() if cfg.share_encodings else contextlib.nullcontext(FeatureMemo()) as memo:
        rows = evaluate_all(clip, runs)
    if memo.images_saved:
        computed = sum(features.shape[0] for features in memo.store.values())
        print(f"quickstart: {computed} image encodings computed, {memo.images_saved} shared between rows instead of "
              "recomputed", flush=True)

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(rows, indent=2) + "\n")

    atomic_write(results / "summary.json", write)
    return rows


#: the record of the settings a workdir's run was started with (a rerun with the same ones resumes)
SETTINGS_FILE = "quickstart.json"


def _resume_or_start_afresh(cfg: QuickstartConfig, outputs: Sequence[Path]) -> bool:
    """True when ``cfg.workdir`` holds a run of these very settings; otherwise clear ``outputs`` (the
    example's own folders; the photos are kept) and record the new settings."""
    import json
    import shutil

    from .atomic import atomic_write

    record = cfg.workdir / SETTINGS_FILE
    ours = cfg.identity()
    try:
        theirs = json.loads(record.read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs == ours and not cfg.fresh:
        print(f"quickstart: resuming the run in {cfg.workdir} (finished stages are kept; --fresh starts over)", flush=True)
        return True
    if theirs is not None:
        changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)) if isinstance(theirs, dict) else []
        why = "--fresh" if cfg.fresh or not changed else "other settings (" + ", ".join(changed) + ")"
        print(f"quickstart: starting afresh in {cfg.workdir}: {why}", flush=True)
    for folder in outputs:
        shutil.rmtree(folder, ignore_errors=True)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    atomic_write(record, lambda tmp: Path(tmp).write_text(json.dumps(ours, indent=2) + "\n"))
    return False


def format_table(rows: Sequence[dict]) -> str:
    """The summary as a markdown table."""
    lines = [
        "| method | views | top-1 (%) | top-5 (%) | ECE (%) | images | s / image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        views = r.get("views")  # rows written before the column have none
        lines.append(
            f"| {r['method']} | {'—' if views is None else views} | {r['top1']:.2f} | {r['top5']:.2f} | {r['ece']:.2f} "
            f"| {r['n_images']} | {r['seconds_per_image']:.3f} |"
        )
    return "\n".join(lines)
