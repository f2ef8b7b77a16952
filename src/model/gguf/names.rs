//! llama.cpp tensor names → Hugging Face names (through the schema), and llama.cpp's q/k
//! row permutation undone.

use crate::model::schema::{Projection, TensorRole, GGUF_ROPE_FREQS};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

/// What a llama.cpp tensor is; `None` for tensors we skip (`rope_freqs.weight`, folded
/// into the config), an error naming the tensor for unknown ones.
pub(super) fn tensor_role(gguf: &str) -> Option<Result<TensorRole>> {
    if gguf == GGUF_ROPE_FREQS {
        return None;
    }
    Some(TensorRole::from_gguf_name(gguf).ok_or_else(|| {
        anyhow!(
            "tensor `{gguf}` is not part of a LLaMA model as rora knows it (expected \
             token_embd, output_norm, output, rope_freqs and blk.N.{{attn_norm, attn_q, attn_k, \
             attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}})"
        )
    }))
}

/// The layer of a tensor whose rows llama.cpp permuted (q and k, for its interleaved
/// RoPE); `None` for the others.
pub(super) fn permuted_layer(role: TensorRole) -> Option<usize> {
    match role {
        TensorRole::Projection(layer, Projection::Q | Projection::K) => Some(layer),
        _ => None,
    }
}

/// Inverts llama.cpp's q/k row permutation: GGUF row `h*hd + 2j + s` holds Hugging Face
/// row `h*hd + s*hd/2 + j` of head `h` (`hd` = head_dim).
pub fn unpermute_qk(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        bail!("{rows} rows cannot be split into heads of an even head_dim {head_dim}");
    }
    let n_head = rows / head_dim;
    Ok(w.reshape((n_head, head_dim / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// llama.cpp's permutation (Hugging Face → GGUF), the inverse of [`unpermute_qk`]; for
/// writing GGUF files in tests and tools.
pub fn permute_qk(w: &Tensor, head_dim: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    if head_dim == 0 || !head_dim.is_multiple_of(2) || !rows.is_multiple_of(head_dim) {
        bail!("{rows} rows cannot be split into heads of an even head_dim {head_dim}");
    }
    let n_head = rows / head_dim;
    Ok(w.reshape((n_head, 2, head_dim / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn permutation_round_trips_and_matches_llama_cpp() -> Result<()> {
        // 2 heads of head_dim 4, 1 column: HF rows [a0 a1 b0 b1 | c0 c1 d0 d1] where a/b are
        // the halves of head 0. llama.cpp interleaves the halves: [a0 b0 a1 b1 | ...].
        let hf = Tensor::from_vec((0..8u32).map(|x| x as f32).collect(), (8, 1), &Device::Cpu)?;
        let gguf = permute_qk(&hf, 4)?;
        let rows: Vec<f32> = gguf.flatten_all()?.to_vec1()?;
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back: Vec<f32> = unpermute_qk(&gguf, 4)?.flatten_all()?.to_vec1()?;
        assert_eq!(back, (0..8).map(|x| x as f32).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn names_map_through_the_schema() {
        let role = tensor_role("blk.3.attn_k.weight").unwrap().unwrap();
        assert_eq!(role.hf_name(), "model.layers.3.self_attn.k_proj.weight");
        assert_eq!(permuted_layer(role), Some(3));
        let role = tensor_role("blk.0.ffn_norm.weight").unwrap().unwrap();
        assert_eq!(
            role.hf_name(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(permuted_layer(role), None);
        assert!(tensor_role("rope_freqs.weight").is_none());
        let err = tensor_role("blk.0.attn_q_norm.weight")
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("blk.0.attn_q_norm.weight"));
    }
}
