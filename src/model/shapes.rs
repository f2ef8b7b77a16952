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
use super::weights::Weights;
use anyhow::{bail, Result};

pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// Reads and checks every layer's shape. Errors name the tensor, the shape found and
/// the shape expected.
pub fn read_layer_shapes(cfg: &LlamaConfig, w: &Weights) -> Result<Vec<LayerShape>> {
    let hidden = cfg.hidden_size;
    let head_dim = cfg.head_dim();
    let (_, vocab, emb_dim) = w.matrix("model.embed_tokens.weight")?;
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
    let expect = |name: &str, found: (usize, usize), want: (usize, usize)| -> Result<()> {
        if found != want {
            bail!(
                "tensor `{p}.{name}` has shape [{}, {}], expected [{}, {}] (hidden_size {hidden}, \
                 head_dim {head_dim} from config.json and the layer's other tensors)",
                found.0,
                found.1,
                want.0,
                want.1
            );
        }
        Ok(())
    };
    let (_, q_out, q_in) = w.matrix(&format!("{p}.self_attn.q_proj.weight"))?;
    expect("self_attn.q_proj.weight", (q_out, q_in), (q_out, hidden))?;
    if q_out == 0 || q_out % head_dim != 0 {
        bail!(
            "tensor `{p}.self_attn.q_proj.weight` has {q_out} rows, not a positive multiple of \
             head_dim {head_dim}"
        );
    }
    let (_, k_out, k_in) = w.matrix(&format!("{p}.self_attn.k_proj.weight"))?;
    expect("self_attn.k_proj.weight", (k_out, k_in), (k_out, hidden))?;
    if k_out == 0 || k_out % head_dim != 0 {
        bail!(
            "tensor `{p}.self_attn.k_proj.weight` has {k_out} rows, not a positive multiple of \
             head_dim {head_dim}"
        );
    }
    let (_, v_out, v_in) = w.matrix(&format!("{p}.self_attn.v_proj.weight"))?;
    expect("self_attn.v_proj.weight", (v_out, v_in), (k_out, hidden))?;
    let (_, o_out, o_in) = w.matrix(&format!("{p}.self_attn.o_proj.weight"))?;
    expect("self_attn.o_proj.weight", (o_out, o_in), (hidden, q_out))?;
    let heads = q_out / head_dim;
    let kv_heads = k_out / head_dim;
    if !heads.is_multiple_of(kv_heads) {
        bail!(
            "layer {i} has {heads} query heads and {kv_heads} key/value heads (from \
             `{p}.self_attn.q_proj.weight` and `k_proj`); query heads must be a multiple of \
             key/value heads for grouped-query attention"
        );
    }

    let (_, g_out, g_in) = w.matrix(&format!("{p}.mlp.gate_proj.weight"))?;
    expect("mlp.gate_proj.weight", (g_out, g_in), (g_out, hidden))?;
    let (_, u_out, u_in) = w.matrix(&format!("{p}.mlp.up_proj.weight"))?;
    expect("mlp.up_proj.weight", (u_out, u_in), (g_out, hidden))?;
    let (_, d_out, d_in) = w.matrix(&format!("{p}.mlp.down_proj.weight"))?;
    expect("mlp.down_proj.weight", (d_out, d_in), (hidden, g_out))?;
    w.vector(&format!("{p}.input_layernorm.weight"), hidden)?;
    w.vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?;

    let found = LayerShape {
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        intermediate_size: g_out,
    };
    check_against_config(cfg, i, found)?;
    Ok(found)
}

fn check_against_config(cfg: &LlamaConfig, i: usize, found: LayerShape) -> Result<()> {
    let p = layer_prefix(i);
    let Some(declared) = cfg.declared_layer_shape(i) else {
        return Ok(());
    };
    let exact = cfg.layer_shapes.is_some();
    let checks = [
        (
            "num_attention_heads",
            found.num_attention_heads,
            declared.num_attention_heads,
            "self_attn.q_proj.weight",
        ),
        (
            "num_key_value_heads",
            found.num_key_value_heads,
            declared.num_key_value_heads,
            "self_attn.k_proj.weight",
        ),
        (
            "intermediate_size",
            found.intermediate_size,
            declared.intermediate_size,
            "mlp.gate_proj.weight",
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
            bail!("tensor `{p}.{tensor}` gives layer {i} {key} = {got}, but {whence}");
        }
    }
    Ok(())
}
