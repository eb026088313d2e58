"""The benchmark's figures as a plain-text table, one row per measure with what it means."""

from __future__ import annotations

Row = tuple[str, str, str, str]  # measure, value, unit, note


def _model_rows(r: dict) -> list[Row]:
    """The device's ceiling, the model-only step and, when measured, its torch.compile'd twin."""
    rows = [("device ceiling, matmul", f"{r['ceiling_gflops']:.1f}", "GFLOP/s", "")]
    rows += [
        (
            "model-only train step",
            f"{r['model_only_images_per_s']:.1f}",
            "images/s",
            f"{r['model_only_gflops']:.1f} GFLOP/s = {r['model_only_ratio_to_ceiling']:.2f} of ceiling "
            f"({r['train_step_gflop']:.1f} GFLOP/step)",
        ),
    ]
    if "compiled_model_only_images_per_s" in r:
        verdict = (
            f"pays after {r['compile_break_even_steps']:.0f} steps"
            if r["compile_speedup"] > 1.05
            else "does not pay; keep train.compile off"
        )
        rows.append(
            (
                "model-only, torch.compile",
                f"{r['compiled_model_only_images_per_s']:.1f}",
                "images/s",
                f"{r['compile_speedup']:.2f}x eager, {r['compile_warmup_s']:.0f} s warm-up: {verdict}",
            )
        )
    return rows


def _real_path_rows(r: dict, c: dict) -> list[Row]:
    """The train stage's loader and loop, its loader alone, and the extra worker settings."""
    rows: list[Row] = []
    rows.append(
        (
            "real path (train_loader + train_one_epoch)",
            f"{r['real_path_images_per_s']:.1f}",
            "images/s",
            f"{r['real_path_ratio_to_model_only']:.2f} of model-only ({c['workers']} workers)",
        )
    )
    rows.append(
        (
            "  its loader alone (no model)",
            f"{r['real_loader_images_per_s']:.1f}",
            "images/s",
            f"{r['real_loader_images_per_s'] / r['model_only_images_per_s']:.1f}x what the model consumes",
        )
    )
    for key in sorted(k for k in r if k.startswith("real_path_workers_")):
        w = key.removeprefix("real_path_workers_").removesuffix("_images_per_s")
        rows.append(
            (
                f"real path, {w} workers",
                f"{r[key]:.1f}",
                "images/s",
                f"{r[key] / r['model_only_images_per_s']:.2f} of model-only",
            )
        )
    return rows


def _baseline_rows(r: dict) -> list[Row]:
    """The naive baseline, inference and peak memory."""
    baseline = f"main process; {r['baseline_rss_mb']:.0f} MiB with the libraries imported, before any work"
    rows: list[Row] = [
        (
            "naive baseline (JPEG decode + PIL per sample)",
            f"{r['naive_images_per_s']:.1f}",
            "images/s",
            f"real path is {r['speedup_over_naive']:.1f}x faster",
        ),
        (
            "  its loader alone (no model)",
            f"{r['naive_loader_images_per_s']:.1f}",
            "images/s",
            f"the real path's loader is {r['loader_speedup_over_naive']:.1f}x faster",
        ),
        (  # on the CPU whatever the training device: where src.predict and the served model run
            "inference on the CPU, classify batches",
            f"{r['inference_images_per_s']:.1f}",
            "images/s",
            "decode included",
        ),
        ("inference on the CPU, single image", f"{r['inference_single_latency_ms']:.1f}", "ms", "median"),
        ("peak RSS, training (real path)", f"{r['train_peak_rss_mb']:.0f}", "MiB", baseline),
        ("peak RSS, inference", f"{r['inference_peak_rss_mb']:.0f}", "MiB", baseline),
    ]
    if "train_peak_cuda_mb" in r:
        rows.append(("peak CUDA memory, training", f"{r['train_peak_cuda_mb']:.0f}", "MiB", ""))
    return rows


def format_table(result: dict) -> str:
    """The figures as a plain-text table: one block of rows per precision, then what bf16 gains over fp32."""
    c = result["config"]
    head = (
        f"{c['model']} at {c['image_size']} px, batch {c['batch_size']}, {c['device']} ({c['device_name']}), "
        f"{c['threads']} threads, {c['workers']} workers, {c['n_images']} images ({c['images']}), "
        f"{c['steps']} steps, torch {c['torch']} (native bf16: {native_bf16_text(c)})"
    )
    process = {"baseline_rss_mb": result["baseline_rss_mb"]}
    blocks = {
        precision: _model_rows(r) + _real_path_rows(r, c) + _baseline_rows(r | process)
        for precision, r in result["precisions"].items()
    }
    width = max(len(row[0]) for rows in blocks.values() for row in rows)
    lines = [head]
    for precision, rows in blocks.items():
        lines += ["", f"{'in ' + precision:<{width}}  {'value':>9}  {'unit':<8}  note"]
        lines += [f"{name:<{width}}  {value:>9}  {unit:<8}  {note}".rstrip() for name, value, unit, note in rows]
    if "fp32" in result["precisions"] and "bf16" in result["precisions"]:
        lines += ["", bf16_gain(result["precisions"])]
    return "\n".join(lines)


def bf16_gain(by_precision: dict) -> str:
    """bf16's speed over fp32's for the rows that matter: >1 is faster."""
    fp32, bf16 = by_precision["fp32"], by_precision["bf16"]
    gains = {
        "ceiling": bf16["ceiling_gflops"] / fp32["ceiling_gflops"],
        "model-only": bf16["model_only_images_per_s"] / fp32["model_only_images_per_s"],
        "real path": bf16["real_path_images_per_s"] / fp32["real_path_images_per_s"],
        "inference batches": bf16["inference_images_per_s"] / fp32["inference_images_per_s"],
        "single image": fp32["inference_single_latency_ms"] / bf16["inference_single_latency_ms"],
    }
    return "bf16 over fp32: " + ", ".join(f"{name} {gain:.2f}x" for name, gain in gains.items())


def native_bf16_text(config: dict) -> str:
    """What the CPU offers for bf16, as the bench recorded it (CUDA: see the device name)."""
    features = config.get("cpu_features") or {}
    units = [name for name in ("amx_tile", "avx512_bf16") if features.get(name)]
    return ", ".join(units) if units else "none on this CPU"
