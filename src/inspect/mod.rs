//! The shape report: every layer's widths and parameters, totals, and — against a dense
//! reference config — how much pruning removed.

/// Parameters of one decoder layer (projections and its two norms).
pub use crate::model::schema::layer_params;
use crate::model::schema::outer_params;
use crate::model::{dtype_name, LayerShape, LlamaConfig, LoadedModel};
use serde::Serialize;
use std::fmt::Write;

#[derive(Debug, Clone, Serialize)]
pub struct LayerRow {
    pub layer: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub mlp_width: usize,
    pub params: u64,
    /// 1 - params / dense layer params, when a reference is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReferenceSummary {
    pub source: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub params: u64,
    /// 1 - params / reference params.
    pub pruned_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ShapeReport {
    pub source: String,
    pub dtype: String,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_layers: usize,
    pub uniform: bool,
    pub tied_embeddings: bool,
    pub layers: Vec<LayerRow>,
    pub embedding_params: u64,
    pub params: u64,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceSummary>,
}

/// The dense widths a config declares for each layer.
fn config_layer_shapes(cfg: &LlamaConfig) -> Vec<LayerShape> {
    (0..cfg.num_hidden_layers)
        .map(|i| {
            cfg.declared_layer_shape(i).unwrap_or(LayerShape {
                num_attention_heads: cfg.num_attention_heads,
                num_key_value_heads: cfg.num_key_value_heads(),
                intermediate_size: 0,
            })
        })
        .collect()
}

impl ShapeReport {
    pub fn build(loaded: &LoadedModel, reference: Option<(&str, &LlamaConfig)>) -> Self {
        let m = &loaded.model;
        let cfg = &m.config;
        let hidden = cfg.hidden_size;
        let head_dim = cfg.head_dim();
        let tied = m.lm_head.is_none();
        let ref_shapes = reference.map(|(_, r)| config_layer_shapes(r));
        let layers: Vec<LayerRow> = m
            .layer_shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let params = layer_params(hidden, head_dim, s);
                let pruned_ratio =
                    reference
                        .zip(ref_shapes.as_ref())
                        .and_then(|((_, r), shapes)| {
                            let dense = layer_params(r.hidden_size, r.head_dim(), shapes.get(i)?);
                            Some(1.0 - params as f64 / dense as f64)
                        });
                LayerRow {
                    layer: i,
                    heads: s.num_attention_heads,
                    kv_heads: s.num_key_value_heads,
                    head_dim,
                    mlp_width: s.intermediate_size,
                    params,
                    pruned_ratio,
                }
            })
            .collect();
        let embedding_params = outer_params(hidden, cfg.vocab_size, tied);
        let params = embedding_params + layers.iter().map(|l| l.params).sum::<u64>();
        let reference = reference.zip(ref_shapes).map(|((source, r), shapes)| {
            let ref_params = outer_params(r.hidden_size, r.vocab_size, r.tie_word_embeddings())
                + shapes
                    .iter()
                    .map(|s| layer_params(r.hidden_size, r.head_dim(), s))
                    .sum::<u64>();
            ReferenceSummary {
                source: source.to_string(),
                layers: r.num_hidden_layers,
                hidden_size: r.hidden_size,
                params: ref_params,
                pruned_ratio: 1.0 - params as f64 / ref_params as f64,
            }
        });
        Self {
            source: loaded.source.to_string(),
            dtype: dtype_name(m.dtype()).to_string(),
            hidden_size: hidden,
            vocab_size: cfg.vocab_size,
            num_layers: layers.len(),
            uniform: m.layer_shapes.windows(2).all(|w| w[0] == w[1]),
            tied_embeddings: tied,
            embedding_params,
            params,
            bytes: params * m.dtype().size_in_bytes() as u64,
            layers,
            reference,
        }
    }

    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Shape report: {}\n", self.source);
        let _ = writeln!(
            s,
            "hidden {}, vocab {}, {} layers ({}), {} embeddings, dtype {}\n",
            self.hidden_size,
            self.vocab_size,
            self.num_layers,
            if self.uniform {
                "uniform"
            } else {
                "non-uniform: widths differ per layer"
            },
            if self.tied_embeddings {
                "tied"
            } else {
                "untied"
            },
            self.dtype
        );
        let with_ratio = self.reference.is_some();
        s.push_str("| layer | heads | kv heads | head dim | MLP width | params |");
        s.push_str(if with_ratio { " pruned |\n" } else { "\n" });
        s.push_str("|---:|---:|---:|---:|---:|---:|");
        s.push_str(if with_ratio { "---:|\n" } else { "\n" });
        for l in &self.layers {
            let _ = write!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                l.layer,
                l.heads,
                l.kv_heads,
                l.head_dim,
                l.mlp_width,
                human_count(l.params)
            );
            if with_ratio {
                let cell = l
                    .pruned_ratio
                    .map_or("n/a".to_string(), |r| format!("{:.1}%", 100.0 * r));
                let _ = write!(s, " {cell} |");
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "\n**Total**: {} parameters ({} in embeddings/head/final norm), {} at {}.",
            human_count(self.params),
            human_count(self.embedding_params),
            human_bytes(self.bytes),
            self.dtype
        );
        if let Some(r) = &self.reference {
            let _ = writeln!(
                s,
                "**Against the dense reference** ({}: {} layers, hidden {}, {} parameters): \
                 {:.1}% of the parameters removed.",
                r.source,
                r.layers,
                r.hidden_size,
                human_count(r.params),
                100.0 * r.pruned_ratio
            );
        }
        s
    }
}

pub fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 10_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

pub fn human_bytes(n: u64) -> String {
    const GIB: f64 = 1024.0 * 1024.0 * 1024.0;
    const MIB: f64 = 1024.0 * 1024.0;
    match n as f64 {
        b if b >= GIB => format!("{:.2} GiB", b / GIB),
        b if b >= MIB => format!("{:.1} MiB", b / MIB),
        b => format!("{:.1} KiB", b / 1024.0),
    }
}
