//! `--dry-run`: validate a pipeline and print its plan without loading weights — the
//! stages, the model source and, where the shapes can be read from a config, trainable
//! parameters and a memory estimate.

use super::spec::{PipelineSpec, Stage};
use crate::inspect::{human_bytes, human_count};
use crate::model::schema::{layer_params, outer_params};
use crate::model::{self, LayerShape, LlamaConfig};
use crate::train::FinetuneSpec;
use anyhow::Result;
use std::fmt::Write;

/// The model's config without its weights, and where it came from; `None` with the
/// reason when no config can be read.
fn config_for(spec: &PipelineSpec) -> std::result::Result<(String, LlamaConfig), String> {
    let Some(Stage::Load(load)) = spec.stages.first() else {
        return Err("no load stage".into());
    };
    if let Some(cfg) = &load.config {
        return model::read_config_only(&cfg.to_string_lossy())
            .map(|c| (cfg.display().to_string(), c))
            .map_err(|e| format!("{e:#}"));
    }
    model::read_config_only(&load.model)
        .map(|c| (load.model.clone(), c))
        .map_err(|e| format!("{e:#}"))
}

fn shapes_of(cfg: &LlamaConfig) -> Vec<LayerShape> {
    (0..cfg.num_hidden_layers)
        .map(|i| {
            cfg.declared_layer_shape(i).unwrap_or(LayerShape {
                num_attention_heads: cfg.num_attention_heads,
                num_key_value_heads: cfg.num_key_value_heads(),
                intermediate_size: 4 * cfg.hidden_size,
            })
        })
        .collect()
}

/// The plan as Markdown.
pub fn plan(spec: &PipelineSpec) -> Result<String> {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Plan: {} (dry run: nothing is loaded or written)\n",
        spec.name
    );
    let _ = writeln!(
        s,
        "seed {}, device {:?}, dtype {:?}, run folder {}\n",
        spec.seed,
        spec.device,
        spec.dtype,
        spec.run_dir().display()
    );
    for (i, stage) in spec.stages.iter().enumerate() {
        let detail = match stage {
            Stage::Load(l) => format!("model `{}`", l.model),
            Stage::Attach(a) => a.describe(),
            Stage::Finetune(f) => format!(
                "{} data + {} text file patterns, batch {} (micro {}), lr {:e}, {}",
                f.data.len(),
                f.text.len(),
                f.batch_size,
                f.micro_batch_size,
                f.learning_rate,
                f.max_steps
                    .map_or(format!("{} epochs", f.epochs), |m| format!("{m} steps"))
            ),
            Stage::Export(e) => {
                let outputs = [
                    ("merged", &e.merged),
                    ("merged_uniform", &e.merged_uniform),
                    ("gguf", &e.gguf),
                    ("gguf_base", &e.gguf_base),
                    ("adapter", &e.adapter),
                    ("adapter_gguf", &e.adapter_gguf),
                ];
                let listed: Vec<String> = outputs
                    .iter()
                    .filter_map(|(k, p)| p.as_ref().map(|p| format!("{k} {}", p.display())))
                    .collect();
                format!(
                    "{} ({:?}; GGUF {})",
                    listed.join(", "),
                    e.dtype,
                    e.gguf_dtype.name()
                )
            }
            Stage::Eval(e) => format!(
                "`{}`: {} ({:?}){}",
                e.label,
                e.tasks
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                e.protocol,
                e.limit
                    .map_or(String::new(), |l| format!(", first {l} questions"))
            ),
            Stage::Inspect(Some(i)) => i
                .reference
                .as_ref()
                .map_or(String::new(), |r| format!("against {r}")),
            Stage::Prune(p) => format!(
                "MLP {:.0}%, heads {:.0}%{}",
                100.0 * p.mlp_ratio,
                100.0 * p.head_ratio,
                if p.multiple_of > 1 {
                    format!(", MLP widths multiples of {}", p.multiple_of)
                } else {
                    String::new()
                }
            ),
            Stage::Ppl(p) => format!("on {}", p.text.display()),
            Stage::Inspect(None) => String::new(),
        };
        let _ = writeln!(s, "{}. `{}` {detail}", i + 1, stage.name());
    }
    s.push('\n');
    let (source, cfg) = match config_for(spec) {
        Ok(found) => found,
        Err(why) => {
            let _ = writeln!(
                s,
                "Shapes unknown without the weights ({why}); give `load.config` for an estimate."
            );
            return Ok(s);
        }
    };
    let shapes = shapes_of(&cfg);
    let (h, hd) = (cfg.hidden_size, cfg.head_dim());
    let base: u64 = shapes.iter().map(|sh| layer_params(h, hd, sh)).sum::<u64>()
        + outer_params(h, cfg.vocab_size, cfg.tie_word_embeddings());
    let wbytes = spec.dtype.dtype().size_in_bytes() as u64;
    let _ = writeln!(
        s,
        "Model (from {source}): {} layers, hidden {h}, {} parameters.\n",
        shapes.len(),
        human_count(base)
    );
    let attach = spec.stages.iter().find_map(|st| {
        if let Stage::Attach(a) = st {
            Some(a)
        } else {
            None
        }
    });
    let finetune: Option<&FinetuneSpec> = spec.stages.iter().find_map(|st| {
        if let Stage::Finetune(f) = st {
            Some(f.as_ref())
        } else {
            None
        }
    });
    let trainable = attach
        .filter(|a| a.from.is_none())
        .map_or(0, |a| a.trainable_params(h, cfg.head_dim(), &shapes));
    let (b, t) = finetune.map_or((0, 0), |f| (f.micro_batch_size as u64, f.cutoff_len as u64));
    // Activations kept for the backward pass, per token and layer, in f32 for the
    // softmax/norms and the weights' dtype elsewhere: ~12·hidden + 4·mlp values, plus the
    // attention probabilities heads·T; and the logits with their log-softmax and
    // gradient, 3·vocab per token.
    let act_per_token: u64 = shapes
        .iter()
        .map(|sh| {
            12 * h as u64 + 4 * sh.intermediate_size as u64 + (sh.num_attention_heads as u64) * t
        })
        .sum::<u64>()
        + 3 * cfg.vocab_size as u64;
    let rows = [
        ("weights", base * wbytes, format!("{} params × {wbytes} B", human_count(base))),
        ("adapters (f32)", trainable * 4, format!("{} trainable params × 4 B", human_count(trainable))),
        ("AdamW moments + gradients (f32)", trainable * 12, "3 × trainable × 4 B".to_string()),
        (
            "activations",
            b * t * act_per_token * 4,
            format!("micro batch {b} × cutoff {t} × Σ_layers(12·hidden + 4·mlp + heads·cutoff) + 3·vocab, × 4 B"),
        ),
    ];
    let total: u64 = rows.iter().map(|r| r.1).sum();
    if trainable > 0 {
        let _ = writeln!(
            s,
            "Trainable: {} ({:.3}% of base + adapters, PEFT's `trainable%` and the papers' \
             \"# Params (%)\"; {:.3}% of the base).\n",
            human_count(trainable),
            100.0 * trainable as f64 / (base + trainable) as f64,
            100.0 * trainable as f64 / base as f64
        );
    }
    let _ = writeln!(s, "| memory | estimate | formula |\n|---|---:|---|");
    for (what, bytes, formula) in rows {
        let _ = writeln!(s, "| {what} | {} | {formula} |", human_bytes(bytes));
    }
    let _ = writeln!(s, "| **total** | **{}** | |", human_bytes(total));
    Ok(s)
}
