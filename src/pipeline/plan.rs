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
pub fn plan(spec: &PipelineSpec, measure: bool) -> Result<String> {
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
                "`{}`: {} ({:?}){}{}",
                e.label,
                e.tasks
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                e.protocol,
                e.limit
                    .map_or(String::new(), |l| format!(", first {l} questions")),
                if e.skip > 0 {
                    format!(" after the first {}", e.skip)
                } else {
                    String::new()
                }
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
    // Activations the explicit backward pass keeps, per token and layer: the layer input,
    // the rotated queries, the attention output and the residual after attention
    // (4·hidden), the rotated keys and the values (2·kv width), and the MLP's gate and up
    // (2·mlp); the norms' outputs, the SwiGLU product, attention probabilities and
    // dropout masks are recomputed, not kept. With activation checkpointing only each
    // layer's input is kept, plus one layer's full set while its backward pass runs. The
    // head's blockwise loss keeps a gradient row per token (hidden) and never the whole
    // logits.
    let checkpointing = finetune.is_some_and(|f| f.activation_checkpointing);
    let layer_values = |sh: &LayerShape| -> u64 {
        4 * h as u64 + 2 * (sh.num_key_value_heads * hd) as u64 + 2 * sh.intermediate_size as u64
    };
    let act_per_token: u64 = if checkpointing {
        shapes.len() as u64 * h as u64 + shapes.iter().map(layer_values).max().unwrap_or(0)
    } else {
        shapes.iter().map(layer_values).sum::<u64>()
    } + 2 * h as u64;
    let act_formula = if checkpointing {
        "micro batch {b} × cutoff {t} × (layers·hidden + max layer (4·hidden + 2·kv + 2·mlp) + 2·hidden), × 4 B"
    } else {
        "micro batch {b} × cutoff {t} × (Σ_layers(4·hidden + 2·kv + 2·mlp) + 2·hidden), × 4 B"
    }
    .replace("{b}", &b.to_string())
    .replace("{t}", &t.to_string());
    let rows = [
        (
            "weights",
            base * wbytes,
            format!("{} params × {wbytes} B", human_count(base)),
        ),
        (
            "adapters (f32)",
            trainable * 4,
            format!("{} trainable params × 4 B", human_count(trainable)),
        ),
        (
            "AdamW moments + gradients (f32)",
            trainable * 12,
            "3 × trainable × 4 B".to_string(),
        ),
        ("activations", b * t * act_per_token * 4, act_formula),
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
    if let Some(available) = memory_available() {
        if total > available {
            let _ = writeln!(
                s,
                "\n**Will not fit**: the estimate {} exceeds the {} this machine has available. \
                 Lower `finetune.micro_batch_size` or `cutoff_len`{}, or use a smaller dtype.",
                human_bytes(total),
                human_bytes(available),
                if checkpointing {
                    ""
                } else {
                    ", or set `finetune.activation_checkpointing: true`"
                }
            );
        } else {
            let _ = writeln!(
                s,
                "\nFits: {} of the {} this machine has available.",
                human_bytes(total),
                human_bytes(available)
            );
        }
    }
    if let (Some(a), Some(f)) = (attach.filter(|a| a.from.is_none()), finetune) {
        if measure {
            time_estimate(&mut s, &cfg, &shapes, a, f)?;
        } else {
            let _ = writeln!(
                s,
                "\nTime per step and per epoch: add `--measure` (a calibration step on this machine)."
            );
        }
    }
    Ok(s)
}

/// The measured step time, and per epoch where the epoch's length is known without
/// tokenizing (instruction data, no packing) or `max_steps` fixes the run.
fn time_estimate(
    s: &mut String,
    cfg: &LlamaConfig,
    shapes: &[LayerShape],
    attach: &crate::adapters::AttachSpec,
    f: &FinetuneSpec,
) -> Result<()> {
    let est = crate::train::estimate::estimate_step(cfg, shapes, attach, f)?;
    let _ = writeln!(
        s,
        "\nTime on this machine (measured in {:.1} s on random weights of these shapes, {} \
         threads): **{} per step** of {} × {} tokens.",
        est.calibration_s,
        candle_core::utils::get_num_threads(),
        human_seconds(est.step_s),
        f.batch_size,
        f.cutoff_len
    );
    let examples = (!f.packing && f.text.is_empty())
        .then(|| -> Result<usize> {
            let mut n = 0;
            for path in crate::data::expand_globs(&f.data, "finetune.data")? {
                n += crate::data::read_instruction_file(&path)?.len();
            }
            let n = n.saturating_sub(f.val_set_size);
            Ok(f.limit.map_or(n, |l| n.min(l)))
        })
        .transpose()?;
    if let Some(steps) = f.max_steps {
        let _ = writeln!(
            s,
            "{steps} steps (max_steps): **{}**.",
            human_seconds(est.step_s * steps as f64)
        );
    } else if let Some(n) = examples {
        let per_epoch = n.div_ceil(f.batch_size.max(1));
        let _ = writeln!(
            s,
            "{n} training examples: {per_epoch} steps per epoch, **{} per epoch**, {} for {} epochs.",
            human_seconds(est.step_s * per_epoch as f64),
            human_seconds(est.step_s * (per_epoch * f.epochs) as f64),
            f.epochs
        );
    } else {
        let _ = writeln!(
            s,
            "The epoch's length needs the tokenized data (packing or text files): steps × the time per step."
        );
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes; `None` off Linux.
fn memory_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// `42 s`, `12.5 min`, `3.2 h`, `2.1 days`.
fn human_seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1} h", s / 3600.0)
    } else {
        format!("{:.1} days", s / 86_400.0)
    }
}
