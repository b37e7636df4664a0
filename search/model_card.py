"""The exported model's card: what someone deploying it needs, as JSON (for programs) and Markdown (for people).

The card is built from what the export measured on the exported file itself (accuracy with ONNX
Runtime on val and test, latency re-measured on the sweep's device), next to what the trial recorded,
and from the run folder's records of the data (data.json) and the device (hardware.json).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hwnas.search.units import format_ms

SCHEMA = "hwnas.model_card/1"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
# Where the channels of an image source come from, by dataset kind (3 channels): what a deployment must feed.
RGB_KINDS = frozenset({"image_folder", "cifar10", "cifar100"})


def channel_order(kind: str | None, channels: int) -> str:
    if channels == 1:
        return "grey"
    if kind in RGB_KINDS:
        return "RGB"
    return "as stored in the source data (hwnas does not reorder channels)"


def input_spec(data: Mapping[str, Any], input_name: str = "input") -> dict[str, Any]:
    c, h, w = (int(v) for v in data["input_shape"])
    return {
        "name": input_name,
        "dtype": "float32",
        "shape": ["batch", c, h, w],
        "layout": "NCHW",
        "channels": c,
        "channel_order": channel_order(data.get("kind"), c),
    }


def preprocessing(data: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The transform from stored pixels to the model's input: resize, then per-channel normalisation."""
    norm = data["normalization"]
    _, h, w = (int(v) for v in data["input_shape"])
    return {
        "resolution": [h, w],
        "resize": dataset_cfg.get("resize", "stretch"),
        "channel_order": channel_order(data.get("kind"), int(data["input_shape"][0])),
        "scale": norm["scale"],
        "mean": list(norm["mean"]),
        "std": list(norm["std"]),
        "formula": norm.get("formula", "x = (pixel / scale - mean[c]) / std[c]"),
    }


def reproduce_commands(sweep_overrides: Sequence[str], run_dir: Path, export_args: Sequence[str]) -> dict[str, str]:
    """The commands that make this sweep again (in a new folder) and this export from the run folder."""
    keep = [a for a in sweep_overrides if not a.lstrip("+").startswith(("run_dir=", "resume="))]
    return {
        "sweep": shlex.join(["hwnas", *keep, "run_dir=NEW_FOLDER"]),
        "export": shlex.join(["hwnas-export", f"run_dir={run_dir}", *export_args]),
    }


def _pct(v: Any) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else "-"


def _count(v: Any) -> str:
    return f"{int(v):,}" if isinstance(v, (int, float)) else "-"


def markdown(card: Mapping[str, Any]) -> str:
    """A short page a person reads before deploying: what goes in, what comes out, how good, how fast, where."""
    m, lat, cand = card["metrics"], card["latency"], card["candidate"]
    inp, pre, final = card["input"], card["preprocessing"], card["final_training"]
    device = card.get("device") or {}
    lines = [
        f"# {card['name']} — trial {cand['trial']}",
        "",
        f"Chosen by `{card['selection']['rule']}` from {card['sweep']['trials']} trials of "
        f"`{card['sweep']['experiment_name']}`; exported {card['exported_at']}.",
        "",
        "## Input and output",
        f"- input `{inp['name']}`: {inp['dtype']}, shape {inp['shape']} ({inp['layout']}), channels {inp['channel_order']}",
        f"- preprocessing: resize to {pre['resolution'][0]}x{pre['resolution'][1]} ({pre['resize']}), then "
        f"`{pre['formula']}` with scale {pre['scale']:g}, mean {[round(v, 4) for v in pre['mean']]}, "
        f"std {[round(v, 4) for v in pre['std']]}",
        f"- output `{card['output']['name']}`: {card['output']['dtype']}, shape {card['output']['shape']} — "
        f"{card['output']['meaning']}",
        f"- labels ({len(card['labels'])}): {', '.join(map(str, card['labels'][:50]))}{' …' if len(card['labels']) > 50 else ''}",
        "",
        "## Accuracy (ONNX Runtime, of this file)",
        "| | val | test |",
        "|---|---|---|",
        f"| exported file ({cand['compression']['quant']}) | {_pct(m.get('val_accuracy'))} | {_pct(m.get('test_accuracy'))} |",
    ]
    if cand["compression"]["quant"] != "fp32":
        lines.append(f"| float twin (fp32, same weights) | {_pct(m.get('float_val_accuracy'))} | {_pct(m.get('float_test_accuracy'))} |")
    if final["ran"]:
        lines += ["", f"Final training ran: {final['epochs']} epochs from scratch on {final['trained_on']} "
                  f"(seed {final['seed']}); val accuracy is in-sample since then, test is held out."]
    else:
        lines += ["", "Final training did not run: this is the file measured in the trial, byte for byte apart from "
                  "its metadata (same graph, checked)."]
    trial_lat, export_lat = lat.get("trial") or {}, lat.get("export") or {}
    lines += [
        "",
        "## Latency",
        "| | p50 | p90 | source |",
        "|---|---|---|---|",
        f"| in the trial | {format_ms(trial_lat.get('p50_ms'))} | {format_ms(trial_lat.get('p90_ms'))} | {trial_lat.get('source', '-')} |",
        f"| re-measured at export | {format_ms(export_lat.get('p50_ms'))} | {format_ms(export_lat.get('p90_ms'))} | {export_lat.get('source', '-')} |",
        "",
        f"Device `{lat.get('device_id')}`: {device.get('cpu_model') or '-'}"
        f"{' / ' + device['gpu']['name'] if isinstance(device.get('gpu'), dict) else ''}, "
        f"{device.get('logical_cores', '-')} logical cores, ONNX Runtime {device.get('onnxruntime', '-')}; "
        f"protocol `{lat.get('protocol_key')}`: {lat.get('protocol_text', '-')}.",
    ]
    if export_lat.get("error"):
        lines.append(f"Not re-measured at export: {export_lat['error']} (`hwnas-export` measures again once the device answers).")
    if export_lat.get("prediction_error"):
        lines.append(f"Predicted, not measured: the predictor's error is {export_lat['prediction_error']}.")
    lines += [
        "",
        "## Size",
        f"- file {_count(m.get('model_bytes'))} bytes, {_count(m.get('params'))} parameters, {_count(m.get('macs'))} MACs",
        f"- compression: prune ratio {cand['compression']['prune_ratio']}, format {cand['compression']['quant']} "
        f"({cand['compression'].get('computes') or 'as named'})",
        *(["- training: " + ", ".join(f"{k} {v}" for k, v in card["training"].items() if v is not None)]
          if card.get("training") else []),
        "",
        "## Provenance",
        f"- data `{card['dataset'].get('kind')}` fingerprint `{card['dataset'].get('fingerprint')}`, splits "
        f"{card['dataset'].get('splits')}",
        f"- model file sha256 `{card['files']['sha256']}` (measured file `{card['files']['measured_sha256']}`)",
        f"- seed {card['seed']}; " + ", ".join(f"{k} {v}" for k, v in card["libraries"].items()),
        f"- reproduce the sweep: `{card['reproduce']['sweep']}`",
        f"- reproduce this export: `{card['reproduce']['export']}`",
    ]
    reg = card.get("registered_model")
    if reg and reg.get("version"):
        lines.append(f"- registered as `models:/{reg['name']}/{reg['version']}` (MLflow run {reg.get('run_id')})")
    return "\n".join(lines) + "\n"


def write_card(out_dir: Path, card: Mapping[str, Any]) -> None:
    (out_dir / CARD_JSON).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))
    (out_dir / CARD_MD).write_text(markdown(card), encoding="utf-8")


def protocol_text(protocol: Mapping[str, Any]) -> str:
    """The measurement protocol in words (the card's Markdown)."""
    p = protocol
    return (f"{p.get('blocks')} blocks of >= {float(p.get('block_s', 0)) * 1000:g} ms after warm-up, "
            f"{p.get('threads')} thread(s), batch {p.get('batch_size')}, median of per-run times, repeated while CV > "
            f"{p.get('cv_threshold')}")
