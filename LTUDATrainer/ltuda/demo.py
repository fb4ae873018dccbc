"""`ltuda demo`: the whole path on synthetic data, LTUDA against the labelled-only baseline.

Phantoms in the paper's toy layout (one acquisition; four groups of cases, each labelling one organ;
fully labelled test cases) -> train LTUDA and the labelled-only baseline with the same data, seed and
number of iterations (the baseline trains as long as LTUDA's two stages) -> segment the test cases ->
3D Dice.
"""

import time
from pathlib import Path

from .evaluate import evaluate_case, summarise, write_results
from .manifest import load_manifest
from .predict import run_prediction
from .train.config import make_config
from .train.lock import FolderLock
from .train.trainer import Trainer

METHODS = ("ltuda", "labeled-only")


def run_demo(out: Path, device: str = "auto", report=None, cases_per_site: int = 4, test_cases: int = 4,
             overrides=None) -> dict:
    from .data.phantoms import generate_phantoms
    from .progress import TeeReporter, file_reporter

    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    report.log(f"1/4 writing phantoms to {out / 'phantoms'}")
    manifest_path = generate_phantoms(out / "phantoms", cases_per_site=cases_per_site, test_cases=test_cases, seed=0,
                                      layout="toy")
    manifest = load_manifest(manifest_path)
    test_cases_list = manifest.split("test")
    results = {}
    for step, method in enumerate(METHODS, start=2):
        model_dir = out / "models" / method
        model_dir.mkdir(parents=True, exist_ok=True)
        report.log(f"{step}/4 training {method} (fast preset) -> {model_dir}")
        config = make_config("fast", method=method, device=device, **(overrides or {}))
        if method != "ltuda":  # equal iterations: one stage as long as LTUDA's two
            config.epochs_stage1 += config.epochs_stage2
        run_report = TeeReporter(report, file_reporter(model_dir / "progress.jsonl", model_dir / "train.log"))
        with FolderLock(model_dir, report):  # two demos into one folder would mix their models
            Trainer(manifest, model_dir, config, run_report, cache_dir=out / "cache").run()
        pred_dir = out / "predictions" / method
        scores = []
        for case in test_cases_list:
            pred = pred_dir / f"{case.id}.seg.nrrd"
            run_prediction(model_dir, case.image, pred, device=device, overwrite=True)
            scores.append(evaluate_case(pred, case.label, manifest.classes, truth_value_map=case.value_map))
        results[method] = summarise(scores, manifest.classes)
        write_results(results[method], out / "evaluation" / method)
    report.log("4/4 test-set Dice (fully labelled test site, 3D):")
    names = [c["name"] for c in manifest.classes]
    print(f"{'organ':<12}" + "".join(f"{m:>14}" for m in METHODS))
    for name in names:
        print(f"{name:<12}" + "".join(f"{results[m]['mean'][name]['dice']:>14.3f}" for m in METHODS))
    print(f"(finished in {time.time() - started:.0f} s; models in {out / 'models'}, predictions in {out / 'predictions'})")
    print(f"mean Dice: LTUDA {results['ltuda']['mean_dice']:.3f}, labeled-only {results['labeled-only']['mean_dice']:.3f}")
    return results
