"""The model card (README.md) of an exported model: source, study, trial, scores, verification."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import optuna

from optimizer import __version__
from optimizer.engine.profile import AblationParams
from optimizer.export.checkpoint import EditUnit
from optimizer.export.edit import ExportOptions
from optimizer.export.verify import Agreement
from optimizer.export.write import WriteResult
from optimizer.study.plan import StudyPlan
from optimizer.study.record import TrialRecord, read_baseline
from optimizer.study.storage import redact


def model_card(
    plan: StudyPlan,
    study: optuna.Study,
    trial: TrialRecord,
    params: AblationParams,
    weights: Mapping[str, np.ndarray],
    out: Path,
    options: ExportOptions,
    units: Sequence[EditUnit],
    result: WriteResult,
    agreement: Agreement,
) -> str:
    """README.md of an exported model: source, study, trial, parameters, scores, verification."""
    config = plan.config
    kl, rate = trial.kl_divergence, trial.refusal_rate
    counts = f" ({trial.refused}/{trial.total} eval prompts)" if trial.refused is not None else ""
    baseline = read_baseline(study)
    hub_id = config.model if config.model.count("/") == 1 and not Path(config.model).exists() else None
    front_matter = ["---", "library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx", "- abliterated", "- abopt"]
    front_matter += [f"base_model: {hub_id}"] if hub_id else []
    n_layers = len(next(iter(weights.values()))) if weights else 0
    rows = [f"| {l} | " + " | ".join(f"{float(weights[c][l]):.4f}" for c in weights) + " |" for l in range(n_layers)]
    stored = {
        "requantized": "re-quantized to their original bits, group size and mode",
        "exact": "stored in float32",
        "float": f"stored in {options.dtype or 'the source dtype'}",
    }[agreement.tier]
    if result.dropped:
        stored = f"dequantized and stored dense ({options.dtype or 'the source float dtype'})"
    untouched = "the other tensors are " + (f"cast to {result.cast_to}" if result.cast_to else "byte-identical to the source")
    lines = [
        *front_matter,
        "---",
        f"# {out.name}",
        "",
        f"`{config.model}` with its refusal behaviour ablated: trial {trial.number} of the abopt study "
        f"`{study.study_name}`, baked into the weights.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{config.model}` |",
        f"| study | `{study.study_name}` ({config.path.name}, storage `{redact(plan.storage_url)}`) |",
        f"| trial | {trial.number} |",
        f"| KL divergence on harmless prompts | {kl:.4g} |",
        f"| refusal rate on harmful prompts | {100 * rate:.1f}%{counts} |",
        *(
            [f"| refusal rate of the source model | {100 * baseline.refusal_rate:.1f}% ({baseline.refused}/{baseline.total}) |"]
            if baseline
            else []
        ),
        f"| exported | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by abopt {__version__} |",
        "",
        "## Use",
        "",
        "```python",
        "from mlx_lm import load, generate",
        "",
        f'model, tokenizer = load("{out.name}")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)",
        "print(generate(model, tokenizer, prompt=prompt, max_tokens=128))",
        "```",
        "",
        "## What was changed",
        "",
        "Each steered projection (attention output `attn`, MLP down projection `mlp`, every expert of a "
        "mixture of experts) with weight w along the refusal direction r̂ became W' = W − w·r̂(r̂ᵀW), and its "
        f"bias b' = b − w·r̂(r̂·b) (edit: {params.edit_text()}; with several directions U, W − w·UUᵀW; "
        "norm-preserving: each column then rescaled to its original norm; post-norm: the directions mapped "
        f"through the output norm's weights). {len(result.edited)} tensors were edited and {stored}; {untouched}.",
        "",
        "### Parameters",
        "",
        "```json",
        json.dumps(params.to_dict(), indent=2),
        "```",
        "",
        "### Per-layer weights",
        "",
        "| layer | " + " | ".join(weights) + " |",
        "|---|" + "---|" * len(weights),
        *rows,
        "",
        "## Verification",
        "",
        f"The export was loaded back with mlx-lm and its next-token logits on {agreement.prompts} eval prompts "
        f"(harmful and harmless) compared with the runtime-steered model's ({agreement.compute_dtype}): "
        f"{agreement.describe()}.",
        "",
    ]
    return "\n".join(lines)
