//! The KV cache of incremental decoding: every layer's keys and values of the positions
//! seen so far, written in place into buffers with room to grow.
//!
//! Appending with `Tensor::cat` copied the whole cache at every token: decoding SmolLM2's
//! shape (30 layers, 8 prompts) copied as many bytes per token as the bf16 weights it
//! multiplies, ~13% of the time of a decoding step. Here a token writes its own keys and
//! values only; a full buffer grows to twice its positions (one copy of what it holds, so
//! each position is copied once on average), and attention reads the filled positions in
//! place.

use anyhow::Result;
use candle_core::Tensor;

/// One layer's keys and values: buffers (b, kv_heads, capacity, head_dim), of which the
/// first `len` positions are filled. Not `Clone`: two caches sharing buffers would write
/// over each other's positions (use [`KvCache::with_rows`] for a copy).
#[derive(Debug, Default)]
pub struct LayerKv {
    buffers: Option<(Tensor, Tensor)>,
    len: usize,
}

impl LayerKv {
    /// Appends `k`, `v` (b, kv_heads, t, head_dim) after the filled positions and returns
    /// every position's keys and values, (b, kv_heads, len + t, head_dim) views of the
    /// buffers (each head's positions contiguous, heads `capacity` positions apart).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let needed = self.len + t;
        let capacity = self.capacity()?;
        if needed > capacity {
            let grown = needed.max(2 * capacity);
            let (b, kv_heads, _, head_dim) = k.dims4()?;
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let buffer = Tensor::zeros((b, kv_heads, grown, head_dim), k.dtype(), k.device())?;
                if let Some(old) = old.filter(|_| self.len > 0) {
                    buffer.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                }
                Ok(buffer)
            };
            let old = self.buffers.as_ref();
            self.buffers = Some((grow(old.map(|b| &b.0))?, grow(old.map(|b| &b.1))?));
        }
        let (k_buffer, v_buffer) = self.buffers.as_ref().expect("allocated above");
        k_buffer.slice_set(&k.contiguous()?, 2, self.len)?;
        v_buffer.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok((
            k_buffer.narrow(2, 0, needed)?,
            v_buffer.narrow(2, 0, needed)?,
        ))
    }

    /// The filled positions' keys and values, (b, kv_heads, len, head_dim) views.
    pub fn keys_values(&self) -> Result<Option<(Tensor, Tensor)>> {
        let Some((k, v)) = &self.buffers else {
            return Ok(None);
        };
        Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?)))
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn capacity(&self) -> Result<usize> {
        Ok(match &self.buffers {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        })
    }

    /// A new layer cache of batch rows `rows` (in that order), in buffers of its own with
    /// the same capacity.
    fn with_rows(&self, rows: &Tensor) -> Result<Self> {
        let buffers = match &self.buffers {
            Some((k, v)) => Some((k.index_select(rows, 0)?, v.index_select(rows, 0)?)),
            None => None,
        };
        Ok(Self {
            buffers,
            len: self.len,
        })
    }
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerKv::default()).collect(),
        }
    }

    /// Number of positions already cached.
    pub fn seq_len(&self) -> usize {
        self.layers.first().map_or(0, LayerKv::len)
    }

    /// Layer `i`'s cached keys and values, each (b, kv_heads, T, head_dim), post-rotary.
    pub fn layer(&self, i: usize) -> Result<Option<(Tensor, Tensor)>> {
        match self.layers.get(i) {
            Some(layer) => layer.keys_values(),
            None => Ok(None),
        }
    }

    /// A copy holding the batch rows `rows` (in that order, repeats allowed): the
    /// candidates of a scored question continue from copies of its prompt's row.
    pub fn with_rows(&self, rows: &Tensor) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|layer| layer.with_rows(rows))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// Keeps the batch rows `rows` (in that order): beam search reorders its beams this way.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        *self = self.with_rows(rows)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn positions(b: usize, t: usize, first: f32) -> Tensor {
        let values: Vec<f32> = (0..b * 2 * t * 3).map(|i| first + i as f32).collect();
        Tensor::from_vec(values, (b, 2, t, 3), &Device::Cpu).unwrap()
    }

    /// The cache equals the concatenation of everything appended, across growths, and
    /// copies with rows keep it while the original goes on.
    #[test]
    fn appending_in_place_equals_concatenating() {
        let mut layer = LayerKv::default();
        let mut want: Option<Tensor> = None;
        for (step, t) in [5, 1, 1, 4, 1, 9, 1].into_iter().enumerate() {
            let k = positions(3, t, 100.0 * step as f32);
            let v = (&k * -1.0).unwrap();
            let (got_k, got_v) = layer.append(&k, &v).unwrap();
            let all = match want {
                Some(w) => Tensor::cat(&[&w, &k], 2).unwrap(),
                None => k.clone(),
            };
            assert_eq!(flat(&got_k), flat(&all), "step {step}");
            assert_eq!(flat(&got_v), flat(&(&all * -1.0).unwrap()));
            want = Some(all);
        }
        let want = want.unwrap();
        assert_eq!(layer.len(), 22);
        let mut cache = KvCache {
            layers: vec![layer],
        };
        let rows = Tensor::new(&[2u32, 0, 2], &Device::Cpu).unwrap();
        let mut copy = cache.with_rows(&rows).unwrap();
        let (k, _) = copy.layer(0).unwrap().unwrap();
        for (i, &r) in [2usize, 0, 2].iter().enumerate() {
            assert_eq!(flat(&k.i(i).unwrap()), flat(&want.i(r).unwrap()));
        }
        // Appending to the copy leaves the original's positions as they were.
        let extra = positions(3, 1, -7.0);
        copy.layers[0].append(&extra, &extra).unwrap();
        cache.layers[0].append(&extra, &extra).unwrap();
        let (k, _) = cache.layer(0).unwrap().unwrap();
        assert_eq!(flat(&k.narrow(2, 0, 22).unwrap()), flat(&want));
    }
}
