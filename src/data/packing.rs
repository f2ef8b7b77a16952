//! `finetune.packing`: documents (tokenised items, whole text files) concatenated into
//! one stream with an EOS after each, cut into rows of exactly `row_len` tokens. No
//! padding and no truncation: every token of the stream lands in one row, in order, and
//! every position is a target (position 0 of a row is context only, as in any row).
//!
//! The last partial row is dropped rather than kept padded: then every row is exactly
//! `row_len` tokens, a step trains on exactly `batch_size × cutoff_len` tokens (the
//! token count recovery curves are plotted against), and what is lost is under one row
//! of the whole data. (Hugging Face's `run_clm` `group_texts` does the same.)

use super::examples::Example;

/// Packed rows and what was cut off.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    /// Rows of exactly `row_len` tokens, every position a target.
    pub rows: Vec<Example>,
    /// Tokens of the stream: documents and their EOS tokens.
    pub stream_tokens: usize,
    /// The stream's last `stream_tokens % row_len` tokens, not in any row.
    pub dropped_tokens: usize,
}

/// The stream of `documents` in order, each followed by `eos` (unless it already ends
/// with it).
pub fn stream(documents: &[Vec<u32>], eos: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(documents.iter().map(|d| d.len() + 1).sum());
    for doc in documents {
        out.extend_from_slice(doc);
        if doc.last() != Some(&eos) {
            out.push(eos);
        }
    }
    out
}

/// Packs `documents` into rows of `row_len` tokens (see the module's notes).
pub fn pack(documents: &[Vec<u32>], eos: u32, row_len: usize) -> Packed {
    let stream = stream(documents, eos);
    let row_len = row_len.max(1);
    let rows = stream
        .chunks_exact(row_len)
        .map(|row| Example {
            ids: row.to_vec(),
            targets: vec![true; row_len],
        })
        .collect();
    Packed {
        rows,
        stream_tokens: stream.len(),
        dropped_tokens: stream.len() % row_len,
    }
}
