//! The LLaMA tensor schema: which tensors a `LlamaForCausalLM` checkpoint holds, their
//! names in Hugging Face, PEFT and llama.cpp (GGUF) files, and their shapes from a layer's
//! widths. Loading, shape checks, GGUF renaming, export, the dry-run plan and the random
//! test/bench models all name tensors through here, so the layout is spelled out once.

use super::config::LayerShape;

/// One of a decoder layer's seven projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// The projections an adapter can target, in the order a layer applies them (PEFT's
/// module names).
pub const MODULES: [&str; 7] = {
    let mut names = [""; 7];
    let mut i = 0;
    while i < names.len() {
        names[i] = Projection::ALL[i].module();
        i += 1;
    }
    names
};

impl Projection {
    /// Every projection, in the order a layer applies them.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// The module name adapters target (PEFT's `target_modules`): `q_proj`.
    pub const fn module(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The path inside a layer: `self_attn.q_proj`.
    pub const fn path(self) -> &'static str {
        match self {
            Projection::Q => "self_attn.q_proj",
            Projection::K => "self_attn.k_proj",
            Projection::V => "self_attn.v_proj",
            Projection::O => "self_attn.o_proj",
            Projection::Gate => "mlp.gate_proj",
            Projection::Up => "mlp.up_proj",
            Projection::Down => "mlp.down_proj",
        }
    }

    /// llama.cpp's name inside a block: `attn_q`.
    pub const fn gguf_part(self) -> &'static str {
        match self {
            Projection::Q => "attn_q",
            Projection::K => "attn_k",
            Projection::V => "attn_v",
            Projection::O => "attn_output",
            Projection::Gate => "ffn_gate",
            Projection::Up => "ffn_up",
            Projection::Down => "ffn_down",
        }
    }

    /// The weight's (out, in) in a layer of widths `layer`.
    pub fn shape(self, layer: &LayerShape, hidden: usize, head_dim: usize) -> (usize, usize) {
        let q = layer.num_attention_heads * head_dim;
        let kv = layer.num_key_value_heads * head_dim;
        let mlp = layer.intermediate_size;
        match self {
            Projection::Q => (q, hidden),
            Projection::K | Projection::V => (kv, hidden),
            Projection::O => (hidden, q),
            Projection::Gate | Projection::Up => (mlp, hidden),
            Projection::Down => (hidden, mlp),
        }
    }

    /// Hugging Face name: `model.layers.N.self_attn.q_proj.weight`.
    pub fn hf_name(self, layer: usize) -> String {
        format!("{}.{}.weight", layer_prefix(layer), self.path())
    }

    /// llama.cpp name: `blk.N.attn_q.weight`.
    pub fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.gguf_part())
    }
}

/// PEFT's name prefix of a layer, `base_model.model.model.layers.N` (a `PeftModel` holds
/// the Hugging Face model at `base_model.model`); a projection's PEFT module path is this
/// prefix, a dot and its [`Projection::path`].
pub fn peft_layer_prefix(layer: usize) -> String {
    format!("base_model.model.{}", layer_prefix(layer))
}

/// One of a decoder layer's two RMSNorms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerNorm {
    /// Before attention.
    Input,
    /// Before the MLP.
    PostAttention,
}

impl LayerNorm {
    pub const ALL: [LayerNorm; 2] = [LayerNorm::Input, LayerNorm::PostAttention];

    /// The name inside a layer: `input_layernorm`.
    pub const fn module(self) -> &'static str {
        match self {
            LayerNorm::Input => "input_layernorm",
            LayerNorm::PostAttention => "post_attention_layernorm",
        }
    }

    /// llama.cpp's name inside a block: `attn_norm`.
    pub const fn gguf_part(self) -> &'static str {
        match self {
            LayerNorm::Input => "attn_norm",
            LayerNorm::PostAttention => "ffn_norm",
        }
    }

    /// Hugging Face name: `model.layers.N.input_layernorm.weight`.
    pub fn hf_name(self, layer: usize) -> String {
        format!("{}.{}.weight", layer_prefix(layer), self.module())
    }

    /// llama.cpp name: `blk.N.attn_norm.weight`.
    pub fn gguf_name(self, layer: usize) -> String {
        format!("blk.{layer}.{}.weight", self.gguf_part())
    }
}

/// The token embeddings, (vocab, hidden).
pub const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The norm after the last layer, (hidden).
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output head, (vocab, hidden); absent when tied to the embeddings.
pub const LM_HEAD: &str = "lm_head.weight";
/// llama.cpp's table of Llama-3 RoPE frequency divisors; no Hugging Face counterpart.
pub const GGUF_ROPE_FREQS: &str = "rope_freqs.weight";

/// The Hugging Face name prefix of a layer's tensors: `model.layers.N`.
pub fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// Every tensor of a LLaMA checkpoint, by what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorRole {
    Embeddings,
    FinalNorm,
    Head,
    Norm(usize, LayerNorm),
    Projection(usize, Projection),
}

impl TensorRole {
    /// Every tensor of a model with `layers` layers: embeddings, final norm, then each
    /// layer's projections (in [`Projection::ALL`] order) and norms, and the head last
    /// unless it is tied. Random models draw their values in this order.
    pub fn all(layers: usize, tied: bool) -> impl Iterator<Item = TensorRole> {
        let per_layer = (0..layers).flat_map(|i| {
            Projection::ALL
                .into_iter()
                .map(move |p| TensorRole::Projection(i, p))
                .chain(
                    LayerNorm::ALL
                        .into_iter()
                        .map(move |n| TensorRole::Norm(i, n)),
                )
        });
        [TensorRole::Embeddings, TensorRole::FinalNorm]
            .into_iter()
            .chain(per_layer)
            .chain((!tied).then_some(TensorRole::Head))
    }

    /// The Hugging Face name.
    pub fn hf_name(self) -> String {
        match self {
            TensorRole::Embeddings => EMBED_TOKENS.to_string(),
            TensorRole::FinalNorm => FINAL_NORM.to_string(),
            TensorRole::Head => LM_HEAD.to_string(),
            TensorRole::Norm(i, n) => n.hf_name(i),
            TensorRole::Projection(i, p) => p.hf_name(i),
        }
    }

    /// The llama.cpp name.
    pub fn gguf_name(self) -> String {
        match self {
            TensorRole::Embeddings => "token_embd.weight".to_string(),
            TensorRole::FinalNorm => "output_norm.weight".to_string(),
            TensorRole::Head => "output.weight".to_string(),
            TensorRole::Norm(i, n) => n.gguf_name(i),
            TensorRole::Projection(i, p) => p.gguf_name(i),
        }
    }

    /// The tensor a llama.cpp name stands for; `None` for names outside the schema.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        let outer = [
            TensorRole::Embeddings,
            TensorRole::FinalNorm,
            TensorRole::Head,
        ];
        if let Some(role) = outer.into_iter().find(|r| r.gguf_name() == name) {
            return Some(role);
        }
        let (layer, part) = name.strip_prefix("blk.")?.split_once('.')?;
        let i = layer.parse::<usize>().ok()?;
        let part = part.strip_suffix(".weight")?;
        if let Some(p) = Projection::ALL.into_iter().find(|p| p.gguf_part() == part) {
            return Some(TensorRole::Projection(i, p));
        }
        LayerNorm::ALL
            .into_iter()
            .find(|n| n.gguf_part() == part)
            .map(|n| TensorRole::Norm(i, n))
    }

    /// The shape in a model of this hidden size, vocabulary and head width, with layer
    /// widths `layer_shapes`.
    pub fn shape(
        self,
        hidden: usize,
        vocab: usize,
        head_dim: usize,
        layer_shapes: &[LayerShape],
    ) -> Vec<usize> {
        match self {
            TensorRole::Embeddings | TensorRole::Head => vec![vocab, hidden],
            TensorRole::FinalNorm | TensorRole::Norm(..) => vec![hidden],
            TensorRole::Projection(i, p) => {
                let (out, inp) = p.shape(&layer_shapes[i], hidden, head_dim);
                vec![out, inp]
            }
        }
    }
}

/// Parameters of one layer: its seven projections and two norms.
pub fn layer_params(hidden: usize, head_dim: usize, layer: &LayerShape) -> u64 {
    let projections: usize = Projection::ALL
        .iter()
        .map(|p| {
            let (out, inp) = p.shape(layer, hidden, head_dim);
            out * inp
        })
        .sum();
    (projections + LayerNorm::ALL.len() * hidden) as u64
}

/// Parameters outside the layers: embeddings, the output head when untied, final norm.
pub fn outer_params(hidden: usize, vocab: usize, tied: bool) -> u64 {
    let emb = (hidden * vocab) as u64;
    emb + if tied { 0 } else { emb } + hidden as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_every_format() {
        assert_eq!(MODULES[0], "q_proj");
        assert_eq!(MODULES[6], "down_proj");
        assert_eq!(
            Projection::Q.hf_name(3),
            "model.layers.3.self_attn.q_proj.weight"
        );
        assert_eq!(peft_layer_prefix(0), "base_model.model.model.layers.0");
        assert_eq!(Projection::O.gguf_name(2), "blk.2.attn_output.weight");
        assert_eq!(
            LayerNorm::PostAttention.hf_name(1),
            "model.layers.1.post_attention_layernorm.weight"
        );
        for role in TensorRole::all(2, false) {
            assert_eq!(TensorRole::from_gguf_name(&role.gguf_name()), Some(role));
        }
        assert_eq!(TensorRole::all(2, false).count(), 2 + 2 * 9 + 1);
        assert_eq!(TensorRole::from_gguf_name(GGUF_ROPE_FREQS), None);
        assert_eq!(TensorRole::from_gguf_name("blk.0.attn_q_norm.weight"), None);
    }

    #[test]
    fn shapes_and_parameter_counts() {
        let s = LayerShape {
            num_attention_heads: 4,
            num_key_value_heads: 2,
            intermediate_size: 48,
        };
        assert_eq!(Projection::K.shape(&s, 32, 8), (16, 32));
        assert_eq!(Projection::O.shape(&s, 32, 8), (32, 32));
        assert_eq!(Projection::Down.shape(&s, 32, 8), (32, 48));
        assert_eq!(
            layer_params(32, 8, &s),
            (1024 + 512 + 512 + 1024 + 3 * 1536 + 2 * 32) as u64
        );
    }
}
