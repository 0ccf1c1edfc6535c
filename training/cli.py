"""The `python -m training` command line. Sub-commands import their heavy dependencies lazily."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FILE_LIST = REPO.parent / "shared" / "cnmc_samples" / "kaggle_file_list.txt"


def cmd_index(args) -> int:
    from core.data.dataset import format_summary, index, summarize

    result = index(args.dir)
    summary = summarize(result)
    if args.json:
        summary["problems"] = result.problems.to_dict(orient="records")
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        if len(result.problems):
            print("\nproblems:")
            for row in result.problems.itertuples():
                print(f"  {row.path}: {row.reason}")
    return 0


def cmd_synth(args) -> int:
    from core.data.synthetic import synthesize

    file_list = args.file_list
    if args.replica is not None and file_list is None:
        if not DEFAULT_FILE_LIST.exists():
            print("error: --replica needs --file-list PATH (the Kaggle kaggle_file_list.txt)", file=sys.stderr)
            return 2
        file_list = DEFAULT_FILE_LIST
    from core.data.synthetic import DEMO_NOISE

    noise = DEMO_NOISE if args.noise is None else args.noise
    truth = synthesize(args.dir, cells_per_subject=args.cells_per_subject, noise=noise,
                       difficulty=args.difficulty, seed=args.seed, replica=args.replica, file_list=file_list,
                       workers=args.workers)
    flipped = int(truth["morphology_flipped"].sum())
    print(f"wrote {len(truth)} synthetic cells to {args.dir} "
          f"({flipped} with label-noise-flipped morphology; best achievable accuracy ~{1 - noise:.3f})")
    return 0


def cmd_run(args) -> int:
    from training.config import RunConfig, config_from_args, preset
    from training.store import RunStore
    from training.trainer import train

    if args.preset and (args.config or args.resume):
        print("error: --preset starts a new run from a named preset; it cannot be combined with --config or "
              "--resume", file=sys.stderr)
        return 2
    base = RunConfig.from_file(args.config) if args.config else preset(args.preset) if args.preset else RunConfig()
    wanted = None if args.resume or args.run_id else config_from_args(args, base)
    if wanted is not None and wanted.devices == "multiworker":
        from training import hardware

        if not hardware.worker_role()[2]:  # not the chief: never opens the shared run store
            try:
                train(wanted)
            except RuntimeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print("multiworker: this worker's share of the run completed; the chief's run store records the run")
            return 0
    if wanted is not None:  # a start that cannot be had (ImageNet weights offline) fails before the store is touched
        from core.nets.models import ensure_init

        resolved = wanted.resolved()
        ensure_init(resolved.architecture, resolved.init)
    store = RunStore(args.runs_dir or base.runs_dir)  # a config file's runs_dir counts unless a flag overrides it
    if args.resume:
        try:
            stored = RunConfig.from_dict(store.get_run(args.resume)["config"])
        except KeyError as exc:
            print(f"error: {exc.args[0]}", file=sys.stderr)
            return 2
        wanted = config_from_args(args, base if args.config else stored)
        changed = sorted(f for f, v in wanted.to_dict().items()
                         if f not in ("epochs", "runs_dir") and v != stored.to_dict().get(f))
        if changed:
            print(f"error: --resume continues run {args.resume} with its own settings; only --epochs may change, "
                  f"not: {', '.join(changed)}", file=sys.stderr)
            return 2
        run_id = train(base, store, run_id=args.resume, resume=True, epochs=args.epochs)
    else:
        if args.run_id:  # launched by training.jobs: the config was registered with the run
            base = RunConfig.from_dict(store.get_run(args.run_id)["config"])
        cfg = config_from_args(args, base)
        run_id = train(cfg, store, run_id=args.run_id)
    run = store.get_run(run_id)
    print(f"run {run_id}: {run['status']}" + (f"\n{run['error']}" if run["error"] else ""))
    if run["status"] == "completed" and args.preset == "challenge":
        _challenge_summary(store, run_id)
    return {"completed": 0, "cancelled": 130}.get(run["status"], 1)


def _challenge_summary(store, run_id: str, n_boot: int = 1000) -> None:
    """The challenge's figure: weighted F1 on the labelled preliminary test set with subject-bootstrap CIs,
    then the run's HTML report beside it."""
    from training.evaluate import evaluate
    from training.report import write_report

    result = evaluate(store, [run_id], split="test", n_boot=n_boot)
    prov = result["provenance"]
    print(f"challenge protocol, run {run_id}: test = the labelled preliminary test set ({prov['cells']} cells, "
          f"{len(prov['subjects'])} subjects, {prov['split_strategy']} split; {n_boot} bootstrap resamples)")
    print(f"weighted F1 {_figure(result, 'weighted_f1')}")
    for key in ("balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc"):
        print(f"  {key:<18} {_figure(result, key)}")
    print(f"report: {write_report(store, run_id)}")


def cmd_demo(args) -> int:
    from core.data.synthetic import synthesize
    from training.store import RunStore
    from training.trainer import train

    data = Path(args.data)
    if not (data / "synthetic_truth.csv").exists():
        print(f"generating the synthetic demo dataset in {data} ...")
        synthesize(data, cells_per_subject=20, seed=0)  # the default label noise: a demo worth reviewing
    cfg = demo_config(data, args.runs_dir or "runs", epochs=args.epochs)
    store = RunStore(cfg.runs_dir)
    run_id = train(cfg, store)
    run = store.get_run(run_id)
    summary_path = store.run_dir(run_id) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    print(f"demo run {run_id}: {run['status']}; test accuracy on the synthetic patient-level test split: "
          f"{summary.get('test_accuracy', float('nan')):.3f} ({summary.get('test_cells', 0)} cells)")
    return 0 if run["status"] == "completed" else 1


def demo_config(data: str | Path, runs_dir: str | Path, epochs: int | None = None):
    """The demo: Solution A at 64 px on the synthetic set with the project's default recipe, sized to finish in
    minutes on 2 CPU cores. The default recipe (per-cell standardisation, stain jitter) matters here too: with
    the demo's label noise, the report's recipe learns the synthetic subjects' stains instead of the cells'
    morphology and generalises to new subjects far worse (test accuracy 0.73 against 0.9)."""
    from training.config import preset

    return preset("cross_patient_texture", name="demo", architecture="solution_a", data_dir=str(data), image_size=64, batch_size=32,
                     epochs=epochs or 6, samples_per_class=256, learning_rate=1e-3, early_stopping=False,
                     runs_dir=str(runs_dir), cache_dir=str(Path(data) / ".cache"))


def _figure(result: dict, key: str) -> str:
    """A figure with its subject-bootstrap CI, or "undefined: <reason>" (never nan)."""
    from core.decide.metrics import metric_text

    text = metric_text(result, key, 4)
    ci = result.get("ci95_by_subject_bootstrap", {}).get(key)
    if text.startswith("undefined") or not ci or any(v is None or v != v for v in ci):
        return text
    return f"{text}  (95% CI by subject bootstrap {ci[0]:.4f}-{ci[1]:.4f})"


def cmd_evaluate(args) -> int:
    from core.decide.metrics import headline
    from core.decide.model_folder import is_model_folder
    from training.evaluate import evaluate, evaluate_model_folder
    from training.store import RunStore

    if is_model_folder(args.run_ids[0]):
        if len(args.run_ids) > 1 or not args.data:
            print("error: a model folder (or starter / smear) is evaluated alone, on a labelled folder: "
                  f"evaluate {args.run_ids[0]} --data DIR", file=sys.stderr)
            return 2
        result = evaluate_model_folder(args.run_ids[0], args.data, out_dir=args.out, tta=args.tta,
                                       n_boot=args.n_boot)
        prov = result["provenance"]
        print(f"model {prov['model']} on {prov['data_dir']} ({prov['cells']} cells, {len(prov['subjects'])} "
              f"subjects, {prov['excluded_files']} files excluded{', TTA' if prov['tta'] else ''}); decision rule "
              f"fitted on {prov['rule']}")
        if prov.get("not_assessed_by_gate") is not None:
            print(f"the model's gate would refuse {prov['not_assessed_by_gate']} of these cells as out of distribution "
                  "(the metrics below cover every cell)")
    else:
        store = RunStore(args.runs_dir)
        try:
            result = evaluate(store, args.run_ids, split=args.split, data_dir=args.data, tta=args.tta,
                              target_sensitivity=args.target_sensitivity, n_boot=args.n_boot,
                              data_root=args.data_root, label_overrides=args.label_overrides)
        except (FileNotFoundError, KeyError, ValueError) as exc:
            print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 2
        prov = result["provenance"]
        print(f"runs {', '.join(prov['runs'])} on the {prov['split']} set ({prov['split_strategy']} split, "
              f"{prov['cells']} cells, {len(prov['subjects'])} subjects, data {prov['data_dir']}"
              f"{', TTA' if prov['tta'] else ''})")
        if prov.get("label_overrides"):
            print(f"labels: {prov['label_overrides']['labels_changed']} corrected by {prov['label_overrides']['file']}")
    if prov.get("warning"):
        print(f"WARNING: {prov['warning']}")
    import pandas as pd

    table = pd.DataFrame(result["report_table"]).set_index("class")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    print(headline(result, 4))
    for key in ("weighted_f1", "balanced_accuracy", "sensitivity_all", "specificity_all", "roc_auc", "pr_auc"):
        print(f"{key:<18} {_figure(result, key)}")
    c = result["calibration"]
    ece = f"ECE {c['ece_raw']:.4f} -> {c['ece_calibrated']:.4f}" if "ece_raw" in c else \
        f"ECE {c['ece_calibrated']:.4f}"
    print(f"threshold {result['threshold']:.3f}, temperature {c['rule']['temperature']:.3f}, {ece}, "
          f"uncertain cells {c['uncertain_cells']}")
    if result.get("out_dir"):
        print(f"written to {result['out_dir']}")
    return 0


def cmd_predict(args) -> int:
    from core.nets.explain import gradcam_for
    from core.decide.inference import classify_files, collect_images
    from training.evaluate import resolve_model
    from training.store import RunStore

    if args.normalize_stain and not args.fields:  # refused before any model is loaded
        print("error: --normalize-stain applies to smear fields (--fields CROPS_DIR)", file=sys.stderr)
        return 2
    if args.geojson and not args.fields:
        print("error: --geojson applies to smear fields (--fields CROPS_DIR)", file=sys.stderr)
        return 2
    report_problem = _sample_report_problem(args)
    if report_problem:  # refused before any model is loaded
        print(f"error: {report_problem}", file=sys.stderr)
        return 2
    store = RunStore(args.runs_dir)
    models, rule, size, what, gate, model_path = resolve_model(args.model, store)
    _model_for_input_note(args.model, bool(args.fields))
    paths = collect_images(args.paths)
    if not paths:
        print("error: no image files found", file=sys.stderr)
        return 2
    cells = None
    if args.fields:  # smear fields: segment first, then classify each white cell's crop
        from core.smear.segmentation import segment_files

        crops_dir = Path(args.fields)
        field_names = [str(p) for p in paths]
        from core.smear.fields import takes_context

        outlines: dict = {}  # (field, cell) -> its outline, for --geojson
        cells = segment_files(paths, crops_dir, args.normalize_stain, paired=takes_context(models),
                              outlines=outlines if args.geojson else None)
        problems = {row.field: row.error for row in cells[cells["error"].notna()].itertuples()}
        for message in problems.values():
            print(f"error: {message}", file=sys.stderr)
        paths = [Path(p) for p in cells["crop"].dropna()]
        if not paths:
            print("error: no white cells found in the fields", file=sys.stderr)
            readout = _write_field_readout(cells.iloc[0:0], field_names, problems, what, args.out, args.model)
            if args.report:
                _write_sample_report(args, readout, cells.iloc[0:0], what, model_path)
            if args.geojson:
                _write_field_geojson(cells.iloc[0:0], field_names, args.geojson, outlines)
            return 1
    cam = gradcam_for(models) if args.gradcam else None
    from training.evaluate import crop_margin_of

    table = classify_files(models, paths, size, rule=rule, tta=args.tta, gradcam_dir=args.gradcam, cam=cam,
                           gate=gate, margin=crop_margin_of(args.model, store))
    if cells is not None:  # field, cell number and box first
        boxes = cells.dropna(subset=["crop"]).drop(columns=["error"]).rename(columns={"crop": "path"})
        boxes = boxes.astype({c: int for c in ("cell", "x0", "y0", "x1", "y1", "mask_area_px")})  # not 1.0
        table = boxes.merge(table.assign(path=table["path"].astype(str)), on="path", how="right")
    if args.review_queue:
        from core.decide.inference import review_queue

        table = review_queue(table, rule.threshold)
    if args.out:
        table.to_csv(args.out, index=False)
    from training.audit import model_sha256, record

    record(store, table, {str(p): p for p in paths}, what, model_sha256(model_path), rule, source="cli predict")
    failed = int(table["error"].notna().sum())
    refused = int((table["out_of_distribution"] == True).sum())  # noqa: E712 - None for failed files
    gate_note = "" if gate is not None else " (this model has no out-of-distribution gate: every image was judged)"
    print(f"{what}: {len(table) - failed - refused} classified, {refused} not assessed (out of distribution), "
          f"{failed} failed{gate_note}" + (f"; table written to {args.out}" if args.out else ""))
    if cells is not None:
        readout = _write_field_readout(table, field_names, problems, what, args.out, args.model)
        if args.report:
            _write_sample_report(args, readout, table, what, model_path)
        if args.geojson:
            _write_field_geojson(table, field_names, args.geojson, outlines)
    if not args.out:
        print(table.to_string(index=False))
    for row in table[table["error"].notna()].itertuples():
        print(f"error: {row.path}: {row.error}", file=sys.stderr)
    return 1 if failed else 0


def fields_csv_path(out: str | Path) -> Path:
    """Where `predict --fields --out OUT.csv` writes the per-field read-out: beside OUT, `<OUT stem>_fields.csv`."""
    out = Path(out)
    return out.with_name(out.stem + "_fields.csv")


def _write_field_readout(cells, fields: list[str], problems: dict[str, str], model: str, out: str | None,
                         ref: str | None = None):
    """The per-field read-out (`core.smear.fields.field_readout`: one row per field, bad files and fields without a
    white cell included, then the pooled row) written beside OUT and summarised, one line per field, and returned
    (for --report). The call rule is the model folder's own (`field_rule.json`), else the default."""
    from core.smear.fields import CallRule, field_readout, readout_line
    from core.decide.model_folder import is_model_folder, read_field_rule

    rule = read_field_rule(ref) if ref is not None and is_model_folder(ref) else CallRule()
    readout = field_readout(cells, fields, problems, rule, model=model)
    if out:
        path = fields_csv_path(out)
        readout.to_csv(path, index=False)
        print(f"per-field read-out written to {path}")
    print(f"fields ({rule.describe()}):")
    for row in readout.to_dict("records"):
        print(f"  {readout_line(row)}")
    readout.attrs["rule"] = rule.describe()  # the sample report says which rule made the calls
    return readout


def _write_field_geojson(cells, fields: list[str], out_dir: str, outlines: dict) -> None:
    """predict --geojson: each field that could be read as `<field stem>.geojson` under `out_dir`, its white
    cells as QuPath detections (`core.smear.qupath.field_geojson`), none for a field without a white cell. The
    outlines are those `segment_files` kept while cutting the crops, keyed (field, cell)."""
    from core.data.imageio import image_header
    from core.smear.fields import FieldCalls
    from core.smear.qupath import geojson_path, write_geojson

    written: dict[Path, str] = {}
    for name in fields:
        try:
            readable = image_header(Path(name).read_bytes()) is not None
        except OSError:
            readable = False
        if not readable:
            continue  # not an image: nothing to place objects on (its read-out row says why)
        mine = cells[cells["field"].astype(str) == name] if "field" in cells else cells.iloc[0:0]
        numbers = mine["cell"].dropna().astype(int) if "cell" in mine else []
        rings = {c: outlines[(name, c)] for c in numbers if (name, c) in outlines}
        path = geojson_path(name, out_dir)
        if path in written:
            print(f"warning: {name} and {written[path]} share a file name: {path} holds {name}'s objects",
                  file=sys.stderr)
        written[path] = name
        write_geojson(FieldCalls(name, mine.reset_index(drop=True), {}, None, {}, outlines=rings), out_dir)
    print(f"QuPath objects (File > Import objects): {len(written)} GeoJSON file{'' if len(written) == 1 else 's'} "
          f"written to {out_dir}")


def _sample_report_problem(args) -> str | None:
    """Why predict's --report / --sample-id cannot be had (None when they can): a report is of a smear sample, so
    it needs --fields, and its CSV (beside the page) must not overwrite --out or its read-out."""
    if args.sample_id is not None and not args.report:
        return "--sample-id names the sample in --report FILE.html; give --report too"
    if not args.report:
        return None
    if not args.fields:
        return ("--report writes the report of one smear sample: give its fields with --fields CROPS_DIR (a report "
                "of single cells is not a sample's report)")
    from training.sample_report import report_paths

    page, table = report_paths(args.report)
    if page.suffix.lower() not in (".html", ".htm"):
        return f"--report names the HTML page (FILE.html; its CSV goes beside it), not {page.name}"
    if args.out and table.resolve() in (Path(args.out).resolve(), fields_csv_path(args.out).resolve()):
        return f"--report {page} writes {table}, which --out writes too: choose another name"
    return None


def _write_sample_report(args, readout, table, model: str, model_path: str) -> None:
    """predict --report: the sample's printable report (`training.sample_report`) from the pre-classified read-out
    (the CLI has no verification), with thumbnails of the cells called blast (the crops it wrote to --fields), and
    the same figures as CSV beside it. The sample is what --sample-id says, never a file name."""
    import getpass

    from core.decide.model_folder import is_model_folder, read_card
    from training.audit import model_sha256
    from training.sample_report import blast_crops, sample_report

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name in this environment
        user = ""
    report = sample_report(args.sample_id or "", readout, model=model, model_sha256=model_sha256(model_path),
                           card=read_card(args.model) if is_model_folder(args.model) else None,
                           blast_thumbnails=blast_crops(table), made_by=f"{user} (python -m training predict)".strip())
    page, csv_path = report.write(args.report)
    print(f"sample report written to {page} (printable HTML) and {csv_path} (the same figures as CSV)")
    if not (args.sample_id or "").strip():
        print("note: no --sample-id given: the report says 'no sample id given' (it never takes one from file names)")


def _model_for_input_note(model: str, fields: bool) -> None:
    """The model for the input: C-NMC-style single cells go to the starter, smear fields' cells to the smear
    model (the dashboard applies the same rule, `dashboard.services.field_model`); the CLI only says so."""
    from core.decide.model_folder import SHIPPED_ABOUT, SMEAR, STARTER, shipped_available

    if fields and model == STARTER and shipped_available(SMEAR):
        print(f"note: {SHIPPED_ABOUT[SMEAR]} is installed; `predict smear ... --fields DIR` judges field cells with "
              "the model trained on them (the starter was trained on C-NMC's single cells)")
    elif not fields and model == SMEAR:
        print("note: the smear model judges white cells cut from smear photos (give fields with --fields DIR); "
              "for single C-NMC-style cells use `starter`")


def cmd_segment(args) -> int:
    from core.decide.inference import collect_images
    from core.smear.segmentation import segment_files

    paths = collect_images(args.fields)
    if not paths:
        print("error: no image files found", file=sys.stderr)
        return 2
    table = segment_files(paths, args.out, args.normalize_stain)
    table.to_csv(Path(args.out) / "cells.csv", index=False)
    bad = table[table["error"].notna()]
    cells = int(table["cell"].notna().sum())
    print(f"{cells} white cells from {len(paths) - bad['field'].nunique()} of {len(paths)} fields: crops and "
          f"cells.csv (boxes in field pixels) in {args.out}")
    for row in bad.itertuples():
        print(f"error: {row.error}", file=sys.stderr)
    return 0 if cells or bad.empty else 1


def cmd_smear_model(args) -> int:
    """Train the smear model on the labs given, or (with --base) refit a base model for a lab's photos."""
    cache_dir = args.cache_dir
    if cache_dir is None:
        from training.config import RunConfig

        cache_dir = RunConfig().cache_dir
    reproduce = "python -m training " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["smear-model"] else ""
    if args.base and (not args.photos or len(args.photos) != 1):
        print("error: --base refits for one lab: give its photos with --photos DIR (sub-folders blasts/ and "
              "no_blasts/) or --photos FILE.csv (photo,label)", file=sys.stderr)
        return 2
    if not (args.data or args.aria or args.bccd or args.photos):
        print("error: give at least one lab: ALL-IDB folder, --aria DIR, --bccd DIR or --photos DIR|CSV",
              file=sys.stderr)
        return 2
    try:
        return (_smear_refit if args.base else _smear_train)(args, cache_dir, reproduce)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _smear_train(args, cache_dir, reproduce: str) -> int:
    from core.smear.labs import read_labs
    from training.smear import collect_cells
    from training.smear_model import lab_lines, train_smear_model

    photos = read_labs(args.data, args.aria, args.bccd, args.photos or [], args.lab)
    print(f"{len(photos)} photos: " + ", ".join(f"{lab} {n}" for lab, n in
                                                photos["lab"].value_counts(sort=False).items()))
    cs = collect_cells(photos, cache_dir, progress=print)
    card = train_smear_model(cs, args.out, args.folds, reproduce=reproduce, progress=print)
    print(f"smear model written to {args.out}: {card['data']['cells']} cells of {card['data']['photos']} photos; "
          f"{card['cross_validation']['folds']}-fold cross-validation by photo:")
    for line in lab_lines(card["cross_validation"]["per_lab"]):
        print(f"  {line[2:]}")
    return 0


def _smear_refit(args, cache_dir, reproduce: str) -> int:
    from core.smear.labs import read_photo_labels
    from training.smear import collect_cells
    from training.smear_model import adapt, lab_lines

    lab = args.lab or Path(args.photos[0]).stem
    photos = read_photo_labels(args.photos[0], lab)
    print(f"{lab}: {len(photos)} photos ({(photos['label'] == 'blasts').sum()} blasts, "
          f"{(photos['label'] == 'no_blasts').sum()} no blasts); segmenting and reading them once ...")
    cs = collect_cells(photos, cache_dir, progress=print)
    card = adapt(args.base, cs, args.out, lab, args.folds, reproduce=reproduce, progress=None)
    a = card["adaptation"]
    print(f"{lab}: {a['folds']}-fold cross-validation by photo")
    for when in ("before", "after"):
        for line in lab_lines(a[when]):
            print(f"  {when} ({'the base as it is' if when == 'before' else 'refitted'}): {line[2:]}")
    print(f"refitted model written to {args.out} (a new version; the base {args.base} is unchanged)")
    return 0


def cmd_package(args) -> int:
    from training.package import run

    return run(args)


def cmd_report(args) -> int:
    from training.report import write_report
    from training.store import RunStore

    try:
        path = write_report(RunStore(args.runs_dir), args.run_id, args.out)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    print(f"report of run {args.run_id} written to {path} (self-contained HTML: open it in any browser, offline)")
    return 0


def cmd_export(args) -> int:
    import shutil

    from core.nets.export import export_model
    from core.decide.model_folder import is_model_folder, load_model_folder
    from training.evaluate import crop_margin_of, resolve_model
    from training.store import RunStore

    store = RunStore(args.runs_dir)
    try:
        models, rule, size, what, _gate, _path = resolve_model(args.model, store)
        path = export_model(models, args.format, args.out, rule, crop_margin_of(args.model, store), what)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    if is_model_folder(args.model):  # the card (data, citation, limits) travels with the model
        card = load_model_folder(args.model).folder / "card.md"
        if card.exists():
            shutil.copyfile(card, Path(args.out) / "card.md")
    print(f"exported {what} as {args.format}: {path} (input: raw RGB 0-255 crops of {size} px; output: P(hem), "
          f"P(all)); crop rule and decision rule in {Path(args.out) / 'contract.json'}")
    return 0


def cmd_audit(args) -> int:
    from training.store import RunStore

    table = RunStore(args.runs_dir).classifications()
    if args.out:
        table.to_csv(args.out, index=False)
        print(f"{len(table)} classification records written to {args.out}")
    else:
        print(table.to_csv(index=False), end="")
    return 0


def cmd_backup(args) -> int:
    from training.store import RunStore

    out = RunStore(args.runs_dir).backup(args.out)
    print(f"run store {Path(args.runs_dir) / 'runs.sqlite'} backed up to {out} (integrity check ok)")
    return 0


def cmd_restore(args) -> int:
    from training.store import restore

    try:
        saved = restore(args.file, args.runs_dir, force=args.force)
    except (FileExistsError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"restored {args.file} into {Path(args.runs_dir) / 'runs.sqlite'}"
          + (f"; the store it replaced is kept as {saved}" if saved else ""))
    return 0


def _stain_flag(parser) -> None:
    """predict --fields and segment share one stain option (one wording, one default)."""
    parser.add_argument("--normalize-stain", action="store_true",
                        help="bring each field cell's crop toward C-NMC's stain (Reinhard colour transfer in LAB)")


def build_parser() -> argparse.ArgumentParser:
    """The `python -m training` parser: one sub-command per `_<command>_parser` helper below, in the order its help
    lists them, each bound to its `cmd_<command>` function (`args.func`)."""
    p = argparse.ArgumentParser(prog="python -m training", description="C-NMC leukemia workbench")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_index_parser, _synth_parser, _run_parser, _demo_parser, _evaluate_parser, _predict_parser,
                _segment_parser, _smear_model_parser, _package_parser, _report_parser, _export_parser,
                _audit_parser, _backup_parser, _restore_parser):
        add(sub)
    return p


def _index_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("index", help="index a C-NMC folder: summary and problems")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_index)


def _synth_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("synth", help="generate a synthetic C-NMC-like dataset in the Kaggle layout")
    s.add_argument("dir")
    s.add_argument("--replica", type=float, metavar="FRACTION",
                   help="reproduce the real tree's names, counts and subjects, scaled to FRACTION")
    s.add_argument("--file-list", help="kaggle_file_list.txt for --replica (the label CSV must sit beside it)")
    s.add_argument("--cells-per-subject", type=int, default=20)
    s.add_argument("--noise", type=float, default=None,
                   help="label-noise rate epsilon (default 0.08: about 8%% of cells look like the other class)")
    s.add_argument("--difficulty", type=float, default=0.3, help="0 easy ... 1 classes identical")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=cmd_synth)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    from training.config import PRESET_NOTES, add_config_arguments

    s = sub.add_parser("run", help="train one job in the foreground (the dashboard runs this in the background)")
    s.add_argument("--config", help="JSON file of RunConfig fields (flags override it)")
    s.add_argument("--resume", metavar="RUN_ID",
                   help="continue a cancelled/failed run from its checkpoint; with --epochs N, extend its schedule "
                        "(any other changed flag is refused)")
    s.add_argument("--run-id", help="run a job already registered in the store (used by the dashboard)")
    s.add_argument("--preset", choices=list(PRESET_NOTES), default=None,
                   help="start from a named preset (flags override it): " +
                        "; ".join(f"{k}: {v}" for k, v in PRESET_NOTES.items() if not k.startswith("cross_")))
    add_config_arguments(s)
    s.set_defaults(func=cmd_run)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("demo", help="generate the synthetic dataset if absent and train a small model")
    s.add_argument("--data", default="data/demo")
    s.add_argument("--runs-dir", default=None)
    s.add_argument("--epochs", type=int, default=None)
    s.set_defaults(func=cmd_demo)


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("evaluate", help="metrics, calibration, subjects and errors of a run or an ensemble")
    s.add_argument("run_ids", nargs="+", metavar="RUN_ID",
                   help="one run, several for an ensemble, or `starter` / `smear` / a model folder (with --data)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"))
    s.add_argument("--data", default=None, help="evaluate on another labelled C-NMC folder instead")
    s.add_argument("--tta", action="store_true", help="average flips and 90-degree rotations")
    s.add_argument("--label-overrides", default=None, metavar="CSV",
                   help="score against reviewers' corrected labels (name,label); written to with_overrides/")
    s.add_argument("--data-root", default=None,
                   help="where the run's dataset is now, if it was moved after training")
    s.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the threshold on validation to reach this sensitivity for all")
    s.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (by subject) for CIs")
    s.add_argument("--out", default=None, help="model folders: where to write metrics.json and predictions")
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_evaluate)


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("predict", help="classify cell images with a run or a .keras file")
    s.add_argument("model", help="starter (the shipped model for single C-NMC-style cells), smear (the shipped model "
                                 "for white cells of smear fields, with --fields), a model folder, RUN_ID or "
                                 "MODEL.keras (all loaded in safe mode)")
    s.add_argument("paths", nargs="+", help="image files and/or folders")
    s.add_argument("--out", help="CSV to write")
    s.add_argument("--gradcam", metavar="DIR", help="write Grad-CAM overlays here")
    s.add_argument("--tta", action="store_true")
    s.add_argument("--runs-dir", default="runs", help="run store (runs, and the audit trail of classifications)")
    s.add_argument("--fields", metavar="CROPS_DIR", default=None,
                   help="the images are smear fields: find their white cells (writing the crops to CROPS_DIR), then "
                        "classify each; the table gains field, cell and box columns, and a per-field read-out "
                        "(white cells, judged, blasts, blast fraction with 95%% CI, call and why, pooled over all "
                        "fields) is printed and written beside --out as <OUT stem>_fields.csv")
    s.add_argument("--geojson", metavar="DIR", default=None,
                   help="with --fields: write each field's white cells as QuPath objects, DIR/<field stem>.geojson "
                        "(File > Import objects; outlines in the photo's pixels, classed blast / normal / review / "
                        "not judged, with calibrated P(blast)); every field that could be read gets a file, one "
                        "with no white cell found a FeatureCollection with no features")
    s.add_argument("--report", metavar="FILE.html", default=None,
                   help="with --fields: a printable report of this smear sample (fields, per field and pooled: white "
                        "cells, judged, blasts, blast %% with 95%% CI, call and why; the model and its card's figures; "
                        "thumbnails of the blast cells) as FILE.html, and the same figures as FILE.csv beside it")
    s.add_argument("--sample-id", metavar="TEXT", default=None,
                   help="what --report calls the sample (e.g. the lab's accession number); never taken from file "
                        "names: without it the report says 'no sample id given'")
    _stain_flag(s)
    s.add_argument("--review-queue", action="store_true",
                   help="order the table for an expert: cells the model cannot judge (out of distribution) first, "
                        "then by closeness of calibrated P(blast) to the threshold; adds review_rank")
    s.set_defaults(func=cmd_predict)


def _segment_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("segment", help="find the white cells of smear fields: C-NMC-like crops and a CSV of "
                                       "their boxes")
    s.add_argument("fields", nargs="+", help="field images (JPEG/PNG/BMP/TIFF) and/or folders")
    s.add_argument("--out", required=True, help="folder for the crops (<field>_cellNN.png) and cells.csv")
    _stain_flag(s)
    s.set_defaults(func=cmd_segment)


def _smear_model_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("smear-model", help="train the smear model (models/smear/) on the labs' smear photos, or "
                                           "refit it for a lab's own photos (--base MODEL --photos DIR)")
    s.add_argument("data", nargs="?", default=None,
                   help="the ALL-IDB folder (ALL_IDB1/ with im/, xyc/ and optionally other/): blast centres per cell")
    s.add_argument("--aria", default=None, help="Aria's photos laid out by aria_even.sh (Benign/ Early/ Pre/ Pro/ "
                                                "Normal/): labelled per photo")
    s.add_argument("--bccd", default=None, help="the BCCD dataset (BCCD/JPEGImages): every white cell normal")
    s.add_argument("--photos", action="append", default=None,
                   help="a lab's photos labelled per photo: a folder with blasts/ and no_blasts/, or a CSV of "
                        "photo,label (repeatable without --base)")
    s.add_argument("--lab", default=None, help="the lab's name for --photos (default: the folder's name)")
    s.add_argument("--base", default=None, help="refit this smear model folder (or `smear`) for --photos: "
                                                "backbone frozen, head, rules and gate refitted")
    s.add_argument("--out", default="models/smear", help="the model folder to write (a new folder for a refit)")
    s.add_argument("--cache-dir", default=None, help="where the segmented cells' features are cached (default: "
                                                      "RunConfig's cache_dir)")
    s.add_argument("--folds", type=int, default=5, help="cross-validation folds over photos (rules and card)")
    s.set_defaults(func=cmd_smear_model)


def _package_parser(sub: argparse._SubParsersAction) -> None:
    from training import package

    s = sub.add_parser("package", help="train, calibrate and package a shipped single-cell model folder (the "
                                       "starter) from a bench_real.py result, with its card",
                       description=package.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    package.add_arguments(s)
    s.set_defaults(func=cmd_package)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("report", help="one self-contained HTML report of a completed run (figures inline)")
    s.add_argument("run_id", metavar="RUN_ID")
    s.add_argument("--out", default=None, help="default: RUN/report.html")
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_report)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("export", help="an inference-only model for use outside this project (plain Keras, "
                                      "TensorFlow SavedModel or ONNX) with its crop and decision rules")
    s.add_argument("model", help="starter, smear, a model folder, RUN_ID or MODEL.keras")
    s.add_argument("--format", choices=("keras", "savedmodel", "onnx"), default="keras")
    s.add_argument("--out", required=True, help="folder to write (model file, contract.json)")
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_export)


def _audit_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("audit", help="the audit trail of classifications (dashboard and CLI) as CSV")
    s.add_argument("--out", help="CSV to write (default: print)")
    s.add_argument("--runs-dir", default="runs")
    s.set_defaults(func=cmd_audit)


def _backup_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("backup", help="copy the run store (runs, audit trail, label reviews) into one SQLite file; "
                                      "safe while the dashboard and workers write")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--out", required=True, help="the backup file to write")
    s.set_defaults(func=cmd_backup)


def _restore_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("restore", help="put a backup back as the run store (checks it first; the replaced store is "
                                       "kept beside it)")
    s.add_argument("file", help="a file written by `backup`")
    s.add_argument("--runs-dir", default="runs")
    s.add_argument("--force", action="store_true", help="replace an existing store (refused while its runs are "
                                                        "queued or running)")
    s.set_defaults(func=cmd_restore)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
