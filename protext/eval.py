"""``python -m protext.eval``: accuracy, calibration and cost of CLIP, CuPL or learned prompts, with
optional test-time adaptation (TPT, C-TPT, ZERO, TDA, MTA).

Examples::

    # CLIP with CoOp's template for DTD, on the novel half of DTD
    python -m protext.eval --dataset dtd --root data --split novel --method clip --templates coop

    # learned prompts, then TPT initialised from them, sharded over 4 processes
    torchrun --nproc_per_node 4 -m protext.eval --dataset oxford_pets --root data \\
        --method prompts --prompts checkpoints/imagenet_cross.safetensors --tta tpt

Flags become a :class:`protext.evaluation.EvalConfig`; :func:`protext.evaluation.evaluate` does
the work (and resumes a killed run from its log); this module prints. Bad input ends with one
``error:`` line and exit 2, Ctrl-C with exit 130 (the log is kept: rerun to continue).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from .errors import UserError, run_command
from .evaluation.config import (
    METHODS, ONLINE_METHODS, PRECISIONS, SCENARIOS, SPLITS, TEMPLATE_RULES, TTA_INITS, TTA_METHODS, EvalConfig, parse_stream_seeds,
)

_DEPRECATED = {"--classnames": "--classes", "--tpt": "--tta tpt", "--precision amp": "--precision fp16"}


def _warn(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated; use {new}.", file=sys.stderr)


class _Deprecated(argparse.Action):
    """An old spelling: stores like the new flag and says so in one line."""

    def __init__(self, *args, new: str, value=None, **kwargs) -> None:
        self.new, self.value = new, value
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        _warn(option_string, self.new)
        setattr(namespace, self.dest, self.value if self.nargs == 0 else values)


def _old(group, flag: str, dest: str, new: str, **kwargs) -> None:
    group.add_argument(flag, dest=dest, action=_Deprecated, new=new, default=argparse.SUPPRESS,
                       help=f"Deprecated spelling of {new}.", **kwargs)


def _data_flags(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, help="Dataset name (see python -m protext.datasets), or 'folder' for a plain image folder with one sub-folder per class.")
    data.add_argument("--root", required=True, help="Folder holding the dataset (CoOp or TPT layout), or the image folder itself for --dataset folder.")
    data.add_argument("--split", default="all", choices=SPLITS, help="Class half: all, base (first ceil(n/2) labels) or novel (the rest); always the test images. [all]")
    data.add_argument("--classes", default=None, metavar="FILE", help="Class list overriding the dataset's names (txt with or without CoOp ids, JSON list, CoOp split file, or a built-in list by dataset name such as dtd).")
    _old(data, "--classnames", "classes", "--classes", metavar="FILE")
    data.add_argument("--limit", type=int, default=None, metavar="N", help="Evaluate only the first N images (dataset order), for smoke runs.")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="ViT-B-16", help="open_clip architecture (ViT-B-16, ViT-L-14, tiny-clip, ...). [ViT-B-16]")
    model.add_argument("--pretrained", default="openai", help="open_clip tag, a local weights file, or 'random' (smoke tests; warns). [openai]")
    model.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda or cuda:N; under torchrun each rank takes cuda:LOCAL_RANK. [auto]")
    model.add_argument("--precision", default="auto", choices=(*PRECISIONS, "amp"), help="fp32; fp16 (CUDA: autocast, and for TPT/C-TPT a gradient scaler, as published); bf16 (a bfloat16 copy of the image tower); auto = fp16 on CUDA, fp32 on CPU; amp = deprecated fp16. [auto]")


def _feature_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("class features")
    group.add_argument("--method", default="clip", choices=METHODS, help="clip: one template; cupl: mean of description features; prompts: learned prompts from --prompts; ensemble: ZERO+Ensemble's 7 templates averaged; ensemble80: CLIP's 80 ImageNet templates averaged (TDA's class features on ImageNet-R and -Sketch); template+cupl, ensemble+cupl, ensemble80+cupl: those templates and the --descriptions of each class in one mean (DMN-ZS's and DPE's published features); ensemble80+descriptors: TPS's prototypes, the mean of the 80 templates' features and the mean of '{class}, which ... {descriptor}' sentences over the --descriptions, averaged. [clip]")
    group.add_argument("--templates", default="protext", choices=TEMPLATE_RULES, help="Template rule: protext (ProText's templates, learned context replaces 'a photo of a'), coop (CoOp's per-dataset templates, ProText's CLIP rows) or tpt ('a photo of a {}.' everywhere). Prompts evaluated on their training dataset keep their training template. [protext]")
    group.add_argument("--template", default=None, help="A template with {} for the class name; overrides --templates.")
    group.add_argument("--descriptions", default=None, metavar="FILE", help="For --method cupl and the +cupl mixes: a protext description file (.jsonl) or a CuPL JSON file {class: [descriptions]}.")
    group.add_argument("--prompts", default=None, metavar="CKPT", help="Learned prompts: a protext .safetensors checkpoint, or a CoOp/TPT .pth ({'state_dict': {'ctx': ...}}).")
    group.add_argument("--allow-other-weights", action="store_true", help="Use prompts trained on other text-tower weights than --pretrained's (refused by default; warns).")


def _tta_flags(parser: argparse.ArgumentParser) -> None:
    """``--tta`` and the run's own TTA flags, then every method's options as the registry declares
    them: the flags several methods share first, then one group per method."""
    from .tta import registry

    tta = parser.add_argument_group("test-time adaptation (unset options take the method's published defaults)")
    methods = ", ".join(f"{name} ({registry.get(name).title})" for name in TTA_METHODS)
    tta.add_argument("--tta", default=None, type=_tta_methods, metavar="METHOD[,METHOD...]", help=f"Adapt to each test image: {methods}. Several methods that read view features (not the prompt tuners) can share one pass: --tta zero,tda,mta encodes each image's views once per view recipe and writes one result per method, each equal to its own run.")
    _old(tta, "--tpt", "tta", "--tta tpt", nargs=0, value="tpt")
    tta.add_argument("--tta-init", default=None, choices=TTA_INITS, help="Prompts the prompt tuners (tpt, ctpt, otpt) start from: handcrafted ('a photo of a'), prompts (a protext checkpoint) or coop (a CoOp .pth). [from --method]")
    _old(tta, "--tpt-init", "tta_init", "--tta-init", choices=TTA_INITS)
    tta.add_argument("--stream-seeds", type=parse_stream_seeds, default=None, metavar="S,S,...", help=f"Online methods ({', '.join(ONLINE_METHODS)}): run one stream per seed (a seeded permutation of the images) and report mean and spread. [--seed]")
    tta.add_argument("--stream-runs", type=int, default=None, metavar="N", help=f"Online methods: N seeded stream orders (OGA's protocol; 100 published), each with a fresh adapter, replayed from one encoding of the images; reports every run's top-1 and ECE with mean, spread and the Expected Tail Accuracy (mean of the worst 10%% of runs). (between 1 and 10000)")
    tta.add_argument("--stream-seed", type=int, default=None, metavar="S", help="Master seed of --stream-runs's orders (OGA: the same (S, N) gives the same N orders for every method), or the seed of every --scenario draw. [42; --scenario: 1]")
    tta.add_argument("--scenario", default=None, choices=SCENARIOS, help="StatA's realistic protocols (any method but the prompt tuners), replayed from one encoding: very_low, low, medium_64 (batches of 64 with 1-4, 2-10, 5-25 active classes), medium_1000, high, very_high (batches of 1000 with 5-25, 25-50, 50-100), all (the whole set reshuffled): a fresh adapter per task; online-low/-medium/-high/-separate: correlated streams of batches of 128 (Dirichlet gamma 0.1, 0.01, 0.001, one class after another), a fresh adapter per stream. Reports the mean over tasks of the per-batch accuracy, with spread and tail.")
    tta.add_argument("--tasks", type=int, default=None, metavar="N", help="Tasks (batch scenarios) or streams (online) of --scenario. [1000; online: 100]")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (opt, users) in registry.shared_flags().items():
        if len(users) > 1:
            group = tta
        else:
            if users[0] not in groups:
                groups[users[0]] = parser.add_argument_group(f"--tta {users[0]}: {registry.get(users[0]).title}")
            group = groups[users[0]]
        _add_option(group, flag, opt, users)


def _tta_methods(text: str) -> str:
    """``--tta``'s value: one method, or several separated by commas (argparse reports a bad name)."""
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in TTA_METHODS]
    if unknown or not all(names):
        raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(TTA_METHODS)}, or several "
                                         "of them separated by commas)")
    return ",".join(names)


def _add_option(group, flag: str, opt, users: tuple[str, ...]) -> None:
    """One registry option as a flag: its type, choices, range, and each method's default."""
    from .tta import registry

    shown: dict[str, list[str]] = {}  # default text -> the methods with that default
    for name in users:
        declared = next(o for _, o in registry.options(registry.get(name)) if o.flag == flag)
        shown.setdefault(declared.shown or "-", []).append(name)
    if len(users) > 1:
        default_text = "; ".join(f"{', '.join(names)}: {text}" for text, names in shown.items())
        text = f"{opt.help} (--tta {', '.join(users)}; {_range_words(opt)}) [{default_text}]"
    else:
        text = f"{opt.help} ({_range_words(opt)}) [{next(iter(shown))}]"
    dest = registry.dest(flag)
    if opt.type is bool and opt.default is False:
        group.add_argument(flag, action="store_true", default=False, dest=dest, help=text)
    elif opt.type is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, dest=dest, help=text)
    elif opt.choices:
        group.add_argument(flag, default=None, choices=opt.choices, dest=dest, help=text)
    else:
        group.add_argument(flag, type=opt.type, default=None, metavar=opt.metavar, dest=dest, help=text)
    for alias in opt.aliases:
        kind = {"nargs": 0, "value": True} if opt.type is bool else {"type": opt.type, "metavar": opt.metavar}
        _old(group, alias, dest, flag, **kind, **({"choices": opt.choices} if opt.choices else {}))


def _range_words(opt) -> str:
    if opt.type is bool:
        return "on/off"
    if opt.choices:
        return " or ".join(opt.choices)
    return opt.range_text()


def _run_flags(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="Images per batch without TTA. [64]")
    run.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images and making views. [2]")
    run.add_argument("--seed", type=int, default=0, help="Seed of the random model (--pretrained random) and of every image's views (keyed by seed and image index). [0]")
    run.add_argument("--out", default=None, metavar="FILE", help="Results JSON (with FILE's .md and .reliability.png beside it, and the resume log while running); none of them replaces an existing file without --overwrite. [results/DATASET-SPLIT-METHOD[-TTA]-MODEL-WEIGHTS[-CHECKPOINT]-HASH.json, HASH of every setting that changes the result]")
    run.add_argument("--overwrite", action="store_true", help="Replace existing results files (JSON, .md, .png), and start over where the resume log was started on other images or classes (never needed to resume: a rerun of the same command on the same inputs continues from the log).")
    run.add_argument("--save-logits", action="store_true", help="Also store every image's logits in the JSON (images x classes numbers).")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="Show a progress bar (rank 0). [on]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m protext.eval",
        description="Top-1/top-5/per-class accuracy, ECE, seconds per image and peak memory of CLIP class features "
        "(template, CuPL descriptions, learned prompts or a template ensemble), optionally with test-time adaptation. "
        "Killed runs resume when rerun. Under `torchrun --nproc_per_node N -m protext.eval ...` the images are sharded.",
    )
    for add in (_data_flags, _model_flags, _feature_flags, _tta_flags, _run_flags):
        add(parser)
    return parser


def parse_config(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    """Flags -> :class:`EvalConfig` (argparse exits with code 2 on malformed flags)."""
    args = build_parser().parse_args(argv)
    if args.precision == "amp":
        _warn("--precision amp", "--precision fp16")
        args.precision = "fp16"
    values = vars(args)
    # options declared by the registry without an EvalConfig field of their own travel in tta_options
    fields = set(EvalConfig.__dataclass_fields__)
    extra = {key: values.pop(key) for key in list(values) if key not in fields}
    return EvalConfig(**values).with_tta_values(extra)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 success, 2 bad input, 130 interrupted)."""
    args = sys.argv[1:] if argv is None else list(argv)
    config = parse_config(args)

    def body() -> int:
        # flags and input files first, without torch: a typo costs no import of the model stack
        from .evaluation.preflight import check_inputs

        config.validate()
        check_inputs(config)

        from .distributed import shutdown_all
        from .evaluation import evaluate
        from .results import markdown_table, result_files, summary_row

        finished = False
        if config.tta and "," in config.tta:
            return _many(config, args)
        try:
            payload = evaluate(config, command="python -m protext.eval " + shlex.join(args))
            finished = True
        except UserError:
            if not _is_main():
                return 2  # every rank raises the same error; rank 0 alone prints it
            raise
        finally:
            shutdown_all(meet=finished)
        if payload["runtime"]["world_size"] == 1 or _is_main():
            print(markdown_table([summary_row(payload)]))
            if payload.get("runs"):
                top1 = payload["runs"]["summary"]["top1"]
                print(f"{top1['n_runs']} {payload['runs']['kind']}: top-1 {top1['mean']:.2f} ± {top1['std']:.2f} (ETA, worst "
                      f"{top1['tail_runs']}: {top1['eta']:.2f}; min {top1['min']:.2f}, max {top1['max']:.2f})")
            if payload.get("streams"):
                top1 = payload["streams"]["summary"]["top1"]
                print(f"stream seeds {payload['streams']['seeds']}: top-1 {top1['mean']:.2f} ± {top1['std']:.2f} "
                      f"(min {top1['min']:.2f}, max {top1['max']:.2f})")
            files = result_files(config.output_path())
            print(f"results written to {files['json']} (+ {files['markdown'].name}, {files['reliability'].name})")
        return 0

    return run_command(body, resume_hint=f"the finished images are kept in the log beside {config.output_path()}; rerun the same command to continue")


def _many(config: EvalConfig, args: list[str]) -> int:
    """Several methods in one pass: one results file per method, one table row each."""
    from .evaluation.multi import evaluate_many, single_config
    from .results import markdown_table, result_files, summary_row

    payloads = evaluate_many(config, command="python -m protext.eval " + shlex.join(args))
    print(markdown_table([summary_row(p) for p in payloads.values()]))
    for name in payloads:
        files = result_files(single_config(config, name).output_path())
        print(f"--tta {name}: results written to {files['json']} (+ {files['markdown'].name}, {files['reliability'].name})")
    return 0


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
