//! Per-layer shapes read from the tensors themselves, checked against `config.json`.
//!
//! A pruned model may have its own head count and MLP width in every layer. The
//! tensors are the truth; `config.json` must agree wherever it is specific:
//! `hidden_size`, `vocab_size`, `num_hidden_layers`, `head_dim` always, and every
//! layer's widths when it carries a `layer_shapes` list. Its uniform
//! `num_attention_heads`/`num_key_value_heads`/`intermediate_size` are then read as the
//! dense widths the model was pruned from (LLM-Pruner keeps the dense config): a layer may
//! be narrower, never wider.

use super::config::{LayerShape, LlamaConfig};
use super::schema::{layer_prefix, LayerNorm, Projection, EMBED_TOKENS};
use super::weights::Weights;
use anyhow::{bail, Result};

/// Reads and checks every layer's shape. Errors name the tensor, the shape found and
/// the shape expected.
pub fn read_layer_shapes(cfg: &LlamaConfig, w: &Weights) -> Result<Vec<LayerShape>> {
    let hidden = cfg.hidden_size;
    let head_dim = cfg.head_dim();
    let (_, vocab, emb_dim) = w.matrix(EMBED_TOKENS)?;
    if emb_dim != hidden {
        bail!(
            "tensor `model.embed_tokens.weight` has shape [{vocab}, {emb_dim}] but config.json \
             says hidden_size {hidden}, so it should be [{}, {hidden}]; the config does not \
             belong to these weights",
            cfg.vocab_size
        );
    }
    if vocab != cfg.vocab_size {
        bail!(
            "tensor `model.embed_tokens.weight` has {vocab} rows but config.json says \
             vocab_size {}; the config does not belong to these weights",
            cfg.vocab_size
        );
    }
    let found_layers = w
        .names()
        .filter_map(|n| {
            n.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |m| m + 1);
    if found_layers != cfg.num_hidden_layers {
        bail!(
            "{} holds {found_layers} layers but config.json says num_hidden_layers {}",
            w.origin(),
            cfg.num_hidden_layers
        );
    }
    if let Some(shapes) = &cfg.layer_shapes {
        if shapes.len() != cfg.num_hidden_layers {
            bail!(
                "config.json `layer_shapes` has {} entries, expected one per layer ({})",
                shapes.len(),
                cfg.num_hidden_layers
            );
        }
    }

    (0..cfg.num_hidden_layers)
        .map(|i| read_one_layer(cfg, w, i, hidden, head_dim))
        .collect()
}

fn read_one_layer(
    cfg: &LlamaConfig,
    w: &Weights,
    i: usize,
    hidden: usize,
    head_dim: usize,
) -> Result<LayerShape> {
    let p = layer_prefix(i);
    let expect = |proj: Projection, found: (usize, usize), want: (usize, usize)| -> Result<()> {
        if found != want {
            bail!(
                "tensor `{}` has shape [{}, {}], expected [{}, {}] (hidden_size {hidden}, \
                 head_dim {head_dim} from config.json and the layer's other tensors)",
                proj.hf_name(i),
                found.0,
                found.1,
                want.0,
                want.1
            );
        }
        Ok(())
    };
    let dims = |proj: Projection| -> Result<(usize, usize)> {
        let (_, rows, cols) = w.matrix(&proj.hf_name(i))?;
        Ok((rows, cols))
    };
    // q, k and gate give the layer's widths (their rows); every projection's shape then
    // follows from the schema.
    let rows_of = |proj: Projection, per_head: bool| -> Result<usize> {
        let (rows, cols) = dims(proj)?;
        expect(proj, (rows, cols), (rows, hidden))?;
        if per_head && (rows == 0 || rows % head_dim != 0) {
            bail!(
                "tensor `{}` has {rows} rows, not a positive multiple of head_dim {head_dim}",
                proj.hf_name(i)
            );
        }
        Ok(rows)
    };
    let q_out = rows_of(Projection::Q, true)?;
    let k_out = rows_of(Projection::K, true)?;
    let heads = q_out / head_dim;
    let kv_heads = k_out / head_dim;
    if !heads.is_multiple_of(kv_heads) {
        bail!(
            "layer {i} has {heads} query heads and {kv_heads} key/value heads (from \
             `{p}.self_attn.q_proj.weight` and `k_proj`); query heads must be a multiple of \
             key/value heads for grouped-query attention"
        );
    }
    let g_out = rows_of(Projection::Gate, false)?;
    let found = LayerShape {
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        intermediate_size: g_out,
    };
    for proj in Projection::ALL {
        expect(proj, dims(proj)?, proj.shape(&found, hidden, head_dim))?;
    }
    for norm in LayerNorm::ALL {
        w.vector(&norm.hf_name(i), hidden)?;
    }
    check_against_config(cfg, i, found)?;
    Ok(found)
}

fn check_against_config(cfg: &LlamaConfig, i: usize, found: LayerShape) -> Result<()> {
    let Some(declared) = cfg.declared_layer_shape(i) else {
        return Ok(());
    };
    let exact = cfg.layer_shapes.is_some();
    let checks = [
        (
            "num_attention_heads",
            found.num_attention_heads,
            declared.num_attention_heads,
            Projection::Q,
        ),
        (
            "num_key_value_heads",
            found.num_key_value_heads,
            declared.num_key_value_heads,
            Projection::K,
        ),
        (
            "intermediate_size",
            found.intermediate_size,
            declared.intermediate_size,
            Projection::Gate,
        ),
    ];
    for (key, got, want, tensor) in checks {
        let bad = if exact { got != want } else { got > want };
        if bad {
            let whence = if exact {
                format!("config.json `layer_shapes[{i}].{key}` says {want}")
            } else {
                format!("config.json says {key} {want} and a layer can only be narrower")
            };
            bail!(
                "tensor `{}` gives layer {i} {key} = {got}, but {whence}",
                tensor.hf_name(i)
            );
        }
    }
    Ok(())
}
